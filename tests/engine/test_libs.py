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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc dlopen")
def test_torch_libraries_open_before_import_and_torch_works():
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert "libtorch_cpu.so" in done.stdout.split()
