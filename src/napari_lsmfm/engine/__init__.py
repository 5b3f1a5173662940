"""What every task is made of (no Qt): jobs, devices, the tiled engine, the training
loop and the saved-model store.

- :mod:`~napari_lsmfm.engine.jobs`: ``JobContext`` (progress, cancel), ``Cancelled``,
  ``span`` (the one progress-range mechanism), ``run_job``, ``terminal_progress``;
- :mod:`~napari_lsmfm.engine.device`: resolve a device, tell an out-of-memory error,
  free device memory, retry with smaller windows;
- :mod:`~napari_lsmfm.engine.tiled`: the one window engine (``predict_tiled``,
  ``predict_points``) and the normalising window function;
- :mod:`~napari_lsmfm.engine.train`: ``TrainLoop`` and its ``FitReport``;
- :mod:`~napari_lsmfm.engine.store`: the one atomic writer and the one saved-model
  format.

Importing this package imports nothing heavy: ``lsmfm --help`` needs no torch.
"""
