"""One interface for every task; a saved model opens through the registry by its task."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_lsmfm.model import Foundation, FoundationSpec
from napari_lsmfm.tasks import (
    Deblurrer,
    Segmenter,
    Task,
    TaskResult,
    load_model,
    task_class,
)


def _foundation() -> Foundation:
    torch.manual_seed(0)
    spec = FoundationSpec("unet", embed_dim=8, channels=(8, 16), strides=(2,),
                          num_res_units=0, variant="image_only")
    return Foundation(spec)


def test_every_task_has_the_one_interface():
    fm = _foundation()
    for task in (Segmenter(fm), Deblurrer(fm)):
        assert isinstance(task, Task)
        assert task_class(task.task) is type(task)
    with pytest.raises(ValueError, match="unknown task"):
        task_class("nothing")


def test_a_saved_model_loads_by_its_task(tmp_path):
    fm = _foundation()
    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (8, 24, 24)).astype(np.float32)
    image[:, 8:16, 8:16] += 80
    brushes = np.zeros(image.shape, np.uint8)
    brushes[4, 10:14, 10:14] = 2
    brushes[4, :4, :4] = 1
    seg = Segmenter(fm, steps=5, seed=0, tile=(8, 24, 24))
    report = seg.fit(image, brushes)
    assert report.steps_done == 5 and report["classes"] == [2]
    seg.save(tmp_path / "seg")
    loaded = load_model(tmp_path / "seg", fm)
    assert isinstance(loaded, Segmenter)
    a, b = seg.predict(image), loaded.predict(image)
    assert isinstance(b, TaskResult)
    np.testing.assert_array_equal(a.classes, b.classes)
    names = [kw["name"] for _, kw, _ in b.layers("img")]
    assert names[0] == "img segmentation" and "img uncertainty" in names
    with pytest.raises(ValueError, match="not a saved napari-lsmfm model"):
        load_model(tmp_path, fm)
