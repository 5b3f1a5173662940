"""Load torch's shared libraries without holding the GIL (so the viewer keeps drawing).

``import torch`` in a worker thread freezes napari's UI thread for 0.4-0.5 s here: the
import machinery opens ``libtorch_cpu.so`` (hundreds of MB to map and relocate) while
it holds the GIL, and ctypes' ``CDLL`` does too. A call *through* ctypes into libc's
``dlopen`` releases the GIL, like every ctypes foreign call; once the libraries are in
the process, ``import torch`` finds them loaded and only links against them. Linux (and
other glibc / ELF systems) only; elsewhere, or when torch is imported already, nothing
happens.
"""

from __future__ import annotations

import ctypes
import importlib.util
import sys
from pathlib import Path

__all__ = ["import_quietly", "load_torch_libraries"]

_RTLD_NOW = 0x2  # as torch's own import: local symbols, resolved now
_BIG = ("libc10.so", "libtorch_cpu.so", "libtorch.so", "libtorch_python.so")


def load_torch_libraries() -> list[str]:
    """Open torch's big shared libraries with the GIL released, before ``import torch``
    (call it in a background thread). Returns the names it opened; [] when there was
    nothing to do (torch imported already, not installed, not Linux)."""
    if "torch" in sys.modules or not sys.platform.startswith("linux"):
        return []
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return []
    lib = Path(spec.origin).parent / "lib"
    try:
        libc = ctypes.CDLL(None)
        dlopen = libc.dlopen
    except (OSError, AttributeError):
        return []
    dlopen.argtypes, dlopen.restype = [ctypes.c_char_p, ctypes.c_int], ctypes.c_void_p
    opened = []
    for name in _BIG:
        path = lib / name
        if path.is_file() and dlopen(str(path).encode(), _RTLD_NOW):
            opened.append(name)
    return opened


def import_quietly(module: str):  # noqa: ANN201 (a module)
    """``importlib.import_module(module)`` (in a background thread), torch's libraries
    opened first without the GIL, for a ``module`` that imports torch."""
    import importlib

    load_torch_libraries()
    return importlib.import_module(module)
