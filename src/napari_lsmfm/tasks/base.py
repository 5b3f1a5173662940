"""What every task shares: a validated config, one interface, a result that knows its
layers (no Qt).

A task is a config (:class:`TaskConfig`), a network or head, and a class with the
:class:`Task` interface::

    task = Segmenter(foundation, mode="quick")      # or Deblurrer(foundation), ...
    report = task.fit(image, targets, ctx)          # -> engine.train.FitReport
    result = task.predict(image, ctx, region=None)  # -> TaskResult
    result.layers()                                 # napari LayerData tuples
    task.save(folder); Task.load(folder, foundation=None, device=None)
    task.to_device("cuda")
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

__all__ = ["LayerData", "Task", "TaskConfig", "TaskResult"]

LayerData = tuple[Any, dict, str]


class TaskConfig:
    """Base of every task's settings (subclasses are plain ``@dataclass``es).

    Subclasses put their checks and normalisations in :meth:`validate`; it runs at
    construction and again after every later assignment (``config.tile = (32, 64, 64)``),
    so a config is never in a state its checks refuse: a refused assignment raises
    ValueError and leaves the old value. ``to_dict`` / ``from_dict`` make it JSON-ready
    (unknown keys are ignored, so older saved models load).
    """

    def validate(self) -> None:
        """Check and normalise the fields (raise ValueError saying what is wrong)."""

    def __post_init__(self) -> None:
        self._revalidate()

    def _revalidate(self) -> None:
        object.__setattr__(self, "_validating", True)
        try:
            self.validate()
        finally:
            object.__setattr__(self, "_validating", False)
        object.__setattr__(self, "_ready", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_") or not self.__dict__.get("_ready") or self.__dict__.get(
                "_validating"):
            object.__setattr__(self, name, value)
            return
        before = dataclasses.asdict(self)  # type: ignore[call-overload]
        object.__setattr__(self, name, value)
        try:
            self._revalidate()
        except Exception:
            for key, old in before.items():
                object.__setattr__(self, key, old)
            raise

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)  # type: ignore[call-overload]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in data.items() if k in names})

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


class TaskResult:
    """Base of what ``predict`` returns. ``region``: the (z, y, x) slices of the image the
    arrays cover (None = all of it)."""

    region: tuple[slice, ...] | None = None

    def layers(self, name: str = "image", *, scale: Any = None,
               translate: Any = None) -> list[LayerData]:
        """The result as napari ``(data, kwargs, layer_type)`` tuples, first the one to show;
        ``name``: the source image's name (layer names start with it), ``scale`` /
        ``translate``: the source layer's, shifted by ``region``."""
        raise NotImplementedError

    def geometry(self, scale: Any = None, translate: Any = None) -> dict:
        """``scale`` and ``translate`` of the result layers (translate shifted to ``region``)."""
        import numpy as np

        scale = tuple(float(s) for s in (scale if scale is not None else (1.0, 1.0, 1.0)))[-3:]
        shift = np.asarray(translate if translate is not None else (0.0, 0.0, 0.0), float)[-3:]
        if self.region is not None:
            shift = shift + np.array([s.start or 0 for s in self.region]) * np.asarray(scale)
        return {"scale": scale, "translate": tuple(float(t) for t in shift)}


@runtime_checkable
class Task(Protocol):
    """The interface every task class has (segment, deblur, and those to come)."""

    task: ClassVar[str]
    config: TaskConfig

    def fit(self, image: Any, targets: Any = None, ctx: Any = None) -> Any: ...

    def predict(self, image: Any, ctx: Any = None, *, region: Any = None,
                out: Any = None) -> TaskResult: ...

    def save(self, folder: str | os.PathLike, *, overwrite: bool = False) -> Any: ...

    @classmethod
    def load(cls, folder: str | os.PathLike, foundation: Any = None, *,
             device: str | None = None) -> Any: ...

    def to_device(self, device: Any = "auto") -> Any: ...
