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
import gc
import importlib.util
import os
import sys
import threading
from pathlib import Path

__all__ = ["PRELOAD_ENV", "import_quietly", "load_torch_libraries", "preload_enabled",
           "quiet_collector", "release_free_memory", "share_malloc_arenas", "warm_up"]

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


def _glibc(name: str, argtypes: list, restype: type):  # noqa: ANN202 (a ctypes function)
    """glibc's function ``name``, typed; None off Linux or where libc lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, restype
    return fn


def release_free_memory() -> bool:
    """Give the memory the allocator holds free back to the system (glibc's
    ``malloc_trim(0)``, which also returns the free pages inside the heap, not only its
    top). Between blocks of a long run: a block's buffers, freed, otherwise stay in the
    process's resident set, scattered among smaller live allocations, and the next block
    adds its own on top. True when glibc trimmed something; False elsewhere."""
    trim = _glibc("malloc_trim", [ctypes.c_size_t], ctypes.c_int)
    return trim is not None and bool(trim(0))


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def share_malloc_arenas(arenas: int = 2) -> bool:
    """Let at most ``arenas`` glibc malloc arenas serve every thread (``mallopt
    M_ARENA_MAX``; glibc's default is 8 per core). Each thread that allocates while
    another holds an arena gets its own, and memory freed into an arena stays there: with
    torch's threads, the engine's read-ahead and blending threads and the writer's
    codecs, the resident set of ``lsmfm predict`` was 0.16 GB larger than with two
    arenas, and no faster. Affects arenas made from now on; True where glibc took it."""
    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int], ctypes.c_int)
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, int(arenas)))


def import_quietly(module: str):  # noqa: ANN201 (a module)
    """``importlib.import_module(module)`` (in a background thread), torch's libraries
    opened first without the GIL, for a ``module`` that imports torch."""
    import importlib

    load_torch_libraries()
    return importlib.import_module(module)


PRELOAD_ENV = "LSMFM_NO_PRELOAD"  # set to anything but "" / "0": no background loading
_WARMING: list[threading.Thread] = []


def preload_enabled() -> bool:
    """False when ``LSMFM_NO_PRELOAD`` is set to anything but "" / "0"."""
    return os.environ.get(PRELOAD_ENV, "").strip() in ("", "0")


class quiet_collector:  # noqa: N801 (used as a context manager, like contextlib's)
    """Hold Python's full garbage collections off while big imports run, then freeze
    what they loaded (``gc.freeze``).

    Python collects its oldest generation when it has grown by a quarter, walking every
    object the process has. With napari, torch, sympy and MONAI in one process that is
    millions of objects: each full collection held the GIL for 0.1-0.8 s here, and
    the imports themselves triggered them every few seconds, so the viewer froze that
    long (and again whenever a later allocation burst set one off). Modules, classes
    and functions live as long as the process, so they are moved to the permanent
    generation, which collections skip; younger objects are collected as before.
    """

    def __enter__(self) -> quiet_collector:
        self._threshold = gc.get_threshold()
        first, second, _ = self._threshold
        gc.set_threshold(first, second, 1 << 30)  # young generations only meanwhile
        return self

    def __exit__(self, *exc: object) -> None:
        gc.freeze()
        gc.set_threshold(*self._threshold)


def warm_up() -> threading.Thread | None:
    """Import in a background thread, once per process, what the first model action
    needs: torch (its libraries opened without the GIL), MONAI (without transformers)
    and the parts of torch the first training step imports (``torch._dynamo``, 2 s
    here). The plugin calls it from its first command (a sample, a file opened with its
    reader, a widget), so that the imports' unavoidable GIL holds (torch's C extension
    initialising, 0.25-0.3 s at once) fall while the user looks at the data, not while
    a model loads or trains. Returns the thread, None when one ran already or
    background loading is off (``LSMFM_NO_PRELOAD``)."""
    if _WARMING or not preload_enabled():
        return None

    def run() -> None:
        try:
            with quiet_collector():
                load_torch_libraries()
                import torch

                weight = torch.zeros(1, requires_grad=True)  # a first optimiser step
                (weight * 2).sum().backward()  # imports torch's compiler stack (2 s)
                torch.optim.Adam([weight]).step()

                from napari_lsmfm.model.monai_import import import_monai

                import_monai()
        except Exception:  # noqa: BLE001 (best effort: the real import reports errors)
            pass

    thread = threading.Thread(target=run, name="napari-lsmfm warm-up", daemon=True)
    _WARMING.append(thread)
    thread.start()
    return thread
