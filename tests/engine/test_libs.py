"""torch's shared libraries opened through libc (the GIL released), then torch imports."""

import subprocess
import sys

import pytest

PROBE = (
    "import sys\n"
    "from napari_lsmfm.engine.libs import import_quietly, load_torch_libraries\n"
    "opened = load_torch_libraries()\n"
    "assert 'torch' not in sys.modules\n"
    "torch = import_quietly('torch')\n"
    "assert float(torch.ones(3).sum()) == 3.0\n"
    "assert load_torch_libraries() == []  # imported: nothing to do\n"
    "print(' '.join(opened))\n"
)


def run_fresh(code: str, timeout: float) -> list[str]:
    """``code`` run in a fresh interpreter (nothing imported, nothing frozen); the words
    it printed. Fails the test when it fails."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc dlopen")
def test_torch_libraries_open_before_import_and_torch_works():
    assert "libtorch_cpu.so" in run_fresh(PROBE, 180)


WARM = (
    "import os, sys\n"
    "from napari_lsmfm.engine.libs import warm_up\n"
    "os.environ['LSMFM_NO_PRELOAD'] = '1'\n"
    "assert warm_up() is None  # off\n"
    "os.environ['LSMFM_NO_PRELOAD'] = '0'\n"
    "thread = warm_up()\n"
    "assert thread is not None and warm_up() is None  # once per process\n"
    "thread.join(120)\n"
    "print(*(m in sys.modules for m in ('torch', 'torch._dynamo', 'monai', 'transformers')))\n"
)


def test_warm_up_imports_torch_monai_and_the_training_parts_once():
    assert run_fresh(WARM, 240) == ["True", "True", "True", "False"]


QUIET = (
    "import gc\n"
    "from napari_lsmfm.engine.libs import quiet_collector\n"
    "before = gc.get_threshold()\n"
    "kept = []\n"
    "with quiet_collector():\n"
    "    during = gc.get_threshold()\n"
    "    kept.extend([i] for i in range(50000))  # what an import leaves behind\n"
    "print(before == gc.get_threshold(), during[2] > 10 ** 6, during[:2] == before[:2],\n"
    "      gc.get_freeze_count() >= 50000)\n"
    "cycle = []; cycle.append(cycle); del cycle  # younger garbage is still collected\n"
    "print(gc.collect() >= 1)\n"
)


def test_quiet_collector_holds_full_collections_off_then_freezes_what_was_loaded():
    assert run_fresh(QUIET, 60) == ["True"] * 5


MALLOC = (
    "import numpy as np\n"
    "from napari_lsmfm.engine.libs import release_free_memory, share_malloc_arenas\n"
    "print(share_malloc_arenas(2))\n"
    "parts = [np.ones(20_000) for _ in range(1000)]  # 160 MB in heap-sized pieces\n"
    "del parts[::2]\n"
    "print(release_free_memory())  # the freed half goes back\n"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_malloc_arenas_shared_and_freed_memory_given_back():
    assert run_fresh(MALLOC, 60) == ["True", "True"]
