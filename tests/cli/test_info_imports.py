"""`lsmfm info` imports neither MONAI nor transformers (for weights without a BERT tower):
MONAI's `import monai` loads all its submodules, seconds before any work."""

import json
import subprocess
import sys

from _checkpoints import make_lightning_checkpoint, make_our_checkpoint

# Runs `lsmfm info ARGS` for each JSON list of ARGS, in one fresh process, then says
# which of the slow packages it imported.
PROBE = (
    "import contextlib, io, json, sys\n"
    "from napari_lsmfm.cli import main\n"
    "infos = []\n"
    "for args in map(json.loads, sys.argv[1:]):\n"
    "    out = io.StringIO()\n"
    "    with contextlib.redirect_stdout(out):\n"
    "        assert main(['info', *args]) == 0\n"
    "    infos.append(json.loads(out.getvalue()))\n"
    "print(json.dumps({'infos': infos, 'monai': 'monai' in sys.modules,\n"
    "                  'transformers': 'transformers' in sys.modules}))\n"
)


def test_lsmfm_info_does_not_import_monai(tmp_path):
    from napari_lsmfm.model import inspect_checkpoint

    files = [None, make_our_checkpoint(tmp_path / "model", "swinunetr"),
             make_lightning_checkpoint(tmp_path / "unet.ckpt", "unet", False)]
    arg_lists = [[] if f is None else [str(f)] for f in files]
    done = subprocess.run([sys.executable, "-c", PROBE, *map(json.dumps, arg_lists)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["monai"] is False and seen["transformers"] is False
    # the same description as loading the weights into the network (here, with MONAI)
    assert seen["infos"] == [inspect_checkpoint(f, check=True) for f in files]


def test_lsmfm_sample_imports_neither_torch_nor_monai(tmp_path):
    probe = (
        "import sys\n"
        "from napari_lsmfm.cli import main\n"
        f"assert main(['sample', {str(tmp_path / 'samples')!r}]) == 0\n"
        "print('torch' in sys.modules, 'monai' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["False", "False"]
    assert (tmp_path / "samples" / "samples.json").is_file()
