"""Import MONAI without the packages it would import for networks we never build.

``import monai`` (any ``from monai... import``) loads all of MONAI's submodules, and its
``transchex`` network imports ``transformers`` (BERT) at once where it is installed:
about 3 of its 6-7 s here. The plugin needs ``transformers`` only for the published
BERT text tower (:mod:`.text`), so while MONAI imports, ``transformers`` is hidden from
that one thread; MONAI's own ``optional_import`` then marks TransChex unavailable, and
``import transformers`` works as usual afterwards.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType

__all__ = ["import_monai"]

_HIDDEN = ("transformers",)
_LOCK = threading.Lock()


class _Hide(importlib.abc.MetaPathFinder):
    """Refuses ``_HIDDEN`` packages to the thread importing MONAI, nobody else."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()

    def find_spec(self, name: str, path=None, target=None):  # noqa: ANN001 (importlib API)
        top = name.partition(".")[0]
        if top in _HIDDEN and threading.get_ident() == self.thread:
            raise ModuleNotFoundError(f"{top} is not needed by napari-lsmfm's networks",
                                      name=name)
        return None


def import_monai() -> ModuleType:
    """``monai``, imported now if it is not yet (``transformers`` kept out of it, unless
    something imported ``transformers`` already)."""
    if "monai" in sys.modules:
        return sys.modules["monai"]
    with _LOCK:
        if "monai" in sys.modules:
            return sys.modules["monai"]
        hide = None if any(p in sys.modules for p in _HIDDEN) else _Hide()
        if hide is not None:
            sys.meta_path.insert(0, hide)
        try:
            import monai
        finally:
            if hide is not None:
                sys.meta_path.remove(hide)
    return monai
