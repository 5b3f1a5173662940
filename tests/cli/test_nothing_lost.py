"""Nothing lost, ever: outputs appear under the user's name only when complete, an input
is never an output, and a killed or interrupted run leaves every file as it was."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from napari_lsmfm.cli import main
from napari_lsmfm.engine.store import StagedOutput, remove_stale_temporaries, temporary_path
from napari_lsmfm.io import VolumeError, open_volume, write_volume
from napari_lsmfm.io.output import (
    Outputs,
    check_outputs,
    mark_partial,
    partial_info,
)

VOXEL = (2.0, 1.0, 1.0)


def digest(path: Path) -> str:
    """sha256 of a file, or of every file (names and bytes) under a folder."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small image, its brushes and a complete Zarr result, in one folder."""
    root = tmp_path_factory.mktemp("lost")
    rng = np.random.default_rng(0)
    image = (rng.random((8, 32, 32)) * 1000 + 100).astype(np.uint16)
    write_volume(root / "img.tif", image, voxel_size=VOXEL)
    brushes = np.zeros(image.shape, np.uint8)
    brushes[4, :8], brushes[4, 20:] = 1, 2
    write_volume(root / "brushes.tif", brushes, kind="labels")
    write_volume(root / "group.zarr", image, voxel_size=VOXEL)
    (root / "psf.tif").write_bytes((root / "img.tif").read_bytes())
    (root / "link.tif").symlink_to(root / "img.tif")
    os.link(root / "img.tif", root / "hard.tif")
    return root


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    status = main([*argv])
    err = capsys.readouterr().err
    return status, err


# ------------------------------------------------------------------ inputs are safe


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["deblur", "{r}/img.tif", "--out", "{r}/img.tif"], "--out {r}/img.tif is the image"),
        (["deblur", "{r}/img.tif", "--out", "{r}/link.tif"], "is the image"),
        (["deblur", "{r}/img.tif", "--out", "{r}/hard.tif"], "is the image"),
        (["deblur", "{r}/group.zarr", "--out", "{r}/group.zarr"], "is the image"),
        (["deblur", "{r}/group.zarr/0", "--out", "{r}/group.zarr"], "holds the image"),
        (["deblur", "{r}/group.zarr", "--out", "{r}/group.zarr/0/x.zarr"], "lies inside"),
        (["deblur", "{r}/group.zarr/0", "--out", "{r}/group.zarr/s.zarr"], "Zarr group of"),
        (["deblur", "{r}/img.tif", "--out", "{r}/psf.tif", "--method", "rl", "--psf-file",
          "{r}/psf.tif"], "is the PSF"),
        (["segment", "{r}/img.tif", "--labels", "{r}/brushes.tif", "--out",
          "{r}/brushes.tif"], "is the brushes"),
        (["segment", "{r}/img.tif", "--labels", "{r}/brushes.tif", "--out", "{r}/o.tif",
          "--probabilities", "{r}/img.tif"], "--probabilities {r}/img.tif is the image"),
        (["segment", "{r}/img.tif", "--labels", "{r}/brushes.tif", "--out", "{r}/o.tif",
          "--save-model", "{r}"], "holds the image"),
        (["segment", "{r}/img.tif", "--labels", "{r}/brushes.tif", "--weights",
          "{r}/group.zarr", "--out", "{r}/group.zarr/w.zarr"], "lies inside the weights"),
        (["segment", "{r}/img.tif", "--labels", "{r}/brushes.tif", "--out", "{r}/a.zarr",
          "--uncertainty", "{r}/a.zarr"], "name the same place"),
    ],
)
@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_names_an_input_is_refused_before_any_work(files, capsys, argv, words,
                                                                  overwrite):
    before = {p.name: digest(p) for p in files.iterdir()}
    argv = [a.format(r=files) for a in argv] + ["--quiet"] + (["--overwrite"] * overwrite)
    status, err = run_cli(capsys, *argv)
    assert status == 2, err
    assert words.format(r=files) in err
    assert "choose another output name" in err or "its own name" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert {p.name: digest(p) for p in files.iterdir()} == before


def test_overwrite_never_replaces_a_foreign_folder(files, capsys, tmp_path):
    for name, option in (("notes.zarr", "--out"), ("mine", "--save-model")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
        status, err = run_cli(capsys, "segment", str(files / "img.tif"), "--labels",
                              str(files / "brushes.tif"), *(["--out", str(tmp_path / "c.tif")]
                                                           if option != "--out" else []),
                              option, str(folder), "--overwrite", "--quiet")
        assert status == 2 and "will not replace it" in err and str(folder) in err
        assert (folder / "notes.txt").read_text() == "mine"


def read_only_folder(tmp_path: Path) -> tuple[Path, callable]:
    """A folder this process cannot write to (and how to undo that)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, lambda: folder.chmod(0o755)
    chattr = shutil.which("chattr")
    if chattr and subprocess.run([chattr, "+i", str(folder)], capture_output=True).returncode == 0:
        return folder, lambda: subprocess.run([chattr, "-i", str(folder)], check=False)
    return Path("/sys"), lambda: None  # root: sysfs takes no new files


def test_a_read_only_output_folder_is_found_before_training(files, capsys, tmp_path):
    folder, undo = read_only_folder(tmp_path)
    try:
        t0 = time.perf_counter()
        status, err = run_cli(capsys, "segment", str(files / "img.tif"), "--labels",
                              str(files / "brushes.tif"), "--out", str(tmp_path / "c.tif"),
                              "--save-model", str(folder / "model"), "--quiet")
        assert status == 2 and time.perf_counter() - t0 < 30  # no training first
        assert err.startswith("lsmfm segment: error: cannot write here (")
        assert err.endswith(f"); choose a folder you can write to: {folder / 'model'}\n")
        assert ".partial" not in err and ".probe" not in err and "Traceback" not in err
        assert not (tmp_path / "c.tif").exists()
    finally:
        undo()


# ------------------------------------------------------------------ partial outputs


def test_a_partial_output_is_refused_by_reader_napari_and_rerun(files, capsys, tmp_path):
    from napari_lsmfm.io._napari import napari_get_reader

    out = write_volume(tmp_path / "k.zarr", np.ones((4, 8, 8), np.uint8), kind="labels")
    assert partial_info(out) is None
    mark_partial(out, command="predict", blocks_done=3)
    assert partial_info(out)["blocks_done"] == 3 and partial_info(out / "0")["partial"]
    for reader in (open_volume, napari_get_reader(str(out))):
        with pytest.raises(VolumeError, match="partial output of an interrupted run: rerun "
                                              "with --resume or --overwrite"):
            reader(out)
    rerun = ["deblur", str(files / "img.tif"), "--out", str(out), "--method", "rl",
             "--psf-sigma", "1", "--iterations", "1", "--quiet"]
    status, err = run_cli(capsys, *rerun)
    assert status == 2
    assert f"{out} is a partial output of an interrupted run: rerun with --overwrite" in err
    status, err = run_cli(capsys, *rerun, "--overwrite")
    assert status == 0, err
    assert partial_info(out) is None and open_volume(out).dtype == np.uint16
    assert leftovers(tmp_path) == []


def test_outputs_appear_whole_and_an_error_leaves_the_old_ones(tmp_path):
    old = write_volume(tmp_path / "k.zarr", np.full((4, 8, 8), 7, np.uint8))
    before = digest(old)
    with pytest.raises(KeyboardInterrupt), Outputs(VOXEL, True) as outputs:
        arr = outputs.array(old, (4, 8, 8), np.uint8, "labels")
        (tmp,) = [p for p in tmp_path.iterdir() if p.name.startswith(".k.zarr.partial-")]
        assert partial_info(tmp)["partial"]  # marked before the first block
        with pytest.raises(VolumeError, match="partial output"):
            open_volume(tmp)
        arr[:2] = 1
        raise KeyboardInterrupt
    assert digest(old) == before and leftovers(tmp_path) == []
    with Outputs(VOXEL, True) as outputs:
        arr = outputs.array(old, (4, 8, 8), np.uint8, "labels")
        arr[...] = 3
        assert digest(old) == before  # the old result stays until the new one is complete
        outputs.finish()
    assert np.asarray(open_volume(old).data).min() == 3 and partial_info(old) is None
    assert leftovers(tmp_path) == []
    # a disk that fills up while writing: the error names the user's path
    with pytest.raises(OSError) as info, Outputs(VOXEL, True) as outputs:
        outputs.array(old, (4, 8, 8), np.uint8, "labels")
        raise OSError(28, "No space left on device", str(outputs.staged[0].tmp / "0" / "0"))
    assert info.value.filename == str(old) and info.value.errno == 28
    assert leftovers(tmp_path) == []


def test_a_resumable_output_stays_marked_until_finished(tmp_path):
    out = tmp_path / "r.zarr"
    with pytest.raises(KeyboardInterrupt), Outputs(VOXEL, False, resume=True) as outputs:
        arr = outputs.array(out, (4, 8, 8), np.uint8, "labels")
        arr[:2] = 9
        outputs.note(out, blocks_done=[0])
        raise KeyboardInterrupt  # killed half-way: the half stays, marked, under its name
    assert partial_info(out)["blocks_done"] == [0] and partial_info(out)["resumable"]
    with pytest.raises(VolumeError, match="rerun with --resume or --overwrite"):
        open_volume(out)
    with pytest.raises(ValueError, match="cannot be resumed"), Outputs(VOXEL, False,
                                                                      resume=True) as outputs:
        outputs.array(out, (4, 8, 9), np.uint8, "labels")
    with Outputs(VOXEL, False, resume=True) as outputs:
        arr = outputs.array(out, (4, 8, 8), np.uint8, "labels")
        assert np.asarray(arr[:2]).min() == 9  # where it stopped
        arr[2:] = 9
        outputs.finish()
    assert partial_info(out) is None and np.asarray(open_volume(out).data).min() == 9
    with pytest.raises(FileExistsError, match="nothing to resume"):
        Outputs(VOXEL, False, resume=True).array(out, (4, 8, 8), np.uint8, "labels")


def test_two_runs_writing_one_output_keep_the_first(tmp_path):
    first = StagedOutput(tmp_path / "a.tif", replace=False)
    second = StagedOutput(tmp_path / "a.tif", replace=False)
    first.tmp.write_text("first")
    second.tmp.write_text("second")
    first.commit()
    with pytest.raises(FileExistsError, match="another run wrote this output"):
        second.commit()
    second.abort()
    assert (tmp_path / "a.tif").read_text() == "first" and leftovers(tmp_path) == []


def test_temporaries_of_killed_runs_are_swept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = temporary_path(tmp_path / "k.zarr")
    stale = mine.with_name(mine.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-"))
    stale.mkdir()
    old = stale.with_name(stale.name.replace(".partial-", ".old-"))
    old.mkdir()
    (old / "kept").write_text("the old result a killed swap moved aside")
    mine.mkdir()  # this process's own: alive, kept
    removed = remove_stale_temporaries(tmp_path / "k.zarr")
    assert sorted(removed) == sorted([stale, old])
    assert (tmp_path / "k.zarr" / "kept").is_file()  # put back: nothing lost
    assert leftovers(tmp_path) == [mine.name]


def test_check_outputs_names_the_users_paths(tmp_path):
    paths = check_outputs({"--out": str(tmp_path / "o.zarr"), "--x": None},
                          {"the image": str(tmp_path / "i.tif")}, overwrite=False)
    assert paths == {"--out": tmp_path / "o.zarr", "--x": None}
    assert leftovers(tmp_path) == []  # the writability probe is gone


# ------------------------------------------------------------------ killed runs


def start(argv: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "napari_lsmfm.cli", *argv], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_partial(proc: subprocess.Popen, folder: Path, name: str, timeout: float = 120
                     ) -> Path:
    """The hidden temporary of ``name`` once it is allocated (marked partial, its array
    there), a moment later: the run is then computing and writing."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = [p for p in folder.glob(f".{name}.partial-*") if (p / "0" / ".zarray").is_file()]
        if found:
            time.sleep(0.3)
            return found[0]
        if proc.poll() is not None:
            raise AssertionError(f"finished before it could be killed: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no partial output appeared")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    rng = np.random.default_rng(1)
    image = (rng.random((16, 128, 128)) * 1000 + 100).astype(np.uint16)
    write_volume(root / "big.tif", image, voxel_size=VOXEL)
    brushes = np.zeros(image.shape, np.uint8)
    brushes[8, :40], brushes[8, 80:] = 1, 2
    write_volume(root / "brushes.tif", brushes, kind="labels")
    return root


@pytest.fixture(scope="module")
def model(big):
    """A saved quick model: applied to a volume, it computes the features window by window
    (seconds of writing to kill into)."""
    from napari_lsmfm.model import load_foundation
    from napari_lsmfm.tasks.segment import Segmenter

    image = np.asarray(open_volume(big / "big.tif").data)
    brushes = np.asarray(open_volume(big / "brushes.tif").data)
    seg = Segmenter(load_foundation(None, device="cpu"), mode="quick", steps=5)
    seg.fit(image, brushes)
    return seg.save(big / "model")


DEBLUR = ["deblur", "big.tif", "--method", "rl", "--psf-sigma", "2,1,1", "--iterations", "60",
          "--tile", "8,32,32", "--quiet"]


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT, signal.SIGTERM])
def test_a_killed_deblur_leaves_no_output_and_the_old_one_whole(big, tmp_path, how):
    for name in ("big.tif", "brushes.tif"):
        shutil.copy(big / name, tmp_path / name)
    old = write_volume(tmp_path / "out.zarr", np.full((16, 128, 128), 5, np.uint16))
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    runs = [(DEBLUR + ["--out", "out.zarr", "--overwrite"], "out.zarr")]
    if how == signal.SIGKILL:
        runs.append((DEBLUR + ["--out", "new.zarr"], "new.zarr"))
    for argv, target in runs:
        proc = start(argv, tmp_path)
        wait_for_partial(proc, tmp_path, target)
        proc.send_signal(how)
        out, err = proc.communicate(timeout=60)
        assert "Traceback" not in err
        if how == signal.SIGKILL:
            assert proc.returncode == -9
        else:  # Ctrl-C or kill: one line, the temporaries removed
            assert proc.returncode == 130 and err.strip() == "lsmfm deblur: interrupted"
            assert leftovers(tmp_path) == []
        assert not (tmp_path / "new.zarr").exists() and out == ""  # killed mid-run
        assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name[0] != "."} == before
    assert np.asarray(open_volume(old).data).max() == 5  # the old result, whole
    if how == signal.SIGKILL:  # a hidden, marked temporary: refused, then swept by a rerun
        (stale, *_) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.zarr")]
        with pytest.raises(VolumeError, match="partial output"):
            open_volume(stale)
        rerun = [a.replace("big.tif", str(tmp_path / "big.tif")) for a in DEBLUR]
        assert main([*rerun, "--out", str(old), "--overwrite", "--iterations", "1"]) == 0
        assert [n for n in leftovers(tmp_path) if n.startswith(".out.zarr")] == []


def test_a_killed_segment_overwrite_keeps_the_complete_result(big, model, tmp_path):
    for name in ("big.tif", "brushes.tif"):
        shutil.copy(big / name, tmp_path / name)
    old = write_volume(tmp_path / "k.zarr", np.full((16, 128, 128), 2, np.uint8), kind="labels")
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    proc = start(["segment", "big.tif", "--model", str(model), "--out", "k.zarr", "--tile",
                  "8,32,32", "--overwrite", "--quiet"], tmp_path)
    partial = wait_for_partial(proc, tmp_path, "k.zarr", timeout=240)
    assert partial_info(partial)["command"] == "segment"
    proc.kill()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -9 and "Traceback" not in err and out == ""  # killed mid-run
    assert {p.name: digest(p) for p in tmp_path.iterdir() if p.name[0] != "."} == before
    assert np.asarray(open_volume(old).data).min() == 2
    # a rerun: the old result is there, complete; no "partial" and no surprise
    status = main(["segment", str(tmp_path / "big.tif"), "--labels",
                   str(tmp_path / "brushes.tif"), "--out", str(old), "--quiet"])
    assert status == 2
