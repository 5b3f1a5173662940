"""`lsmfm pretrain` checks its output folder before any work."""

from __future__ import annotations

import errno
import tempfile

from napari_lsmfm.cli import main


def test_unwritable_out_folder_is_refused_before_training(tmp_path, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    out = tmp_path / "ro" / "run"
    assert main(["pretrain", "--synthetic", "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "cannot write here" in err and str(out) in err and "Traceback" not in err
    assert not out.exists()


def test_out_inside_the_data_folder_is_refused(tmp_path, capsys):
    data = tmp_path / "volumes"
    data.mkdir()
    (data / "a.tif").write_bytes(b"")
    rc = main(["pretrain", str(data), "--out", str(data / "run"), "--steps", "1",
               "--overwrite"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "destroy an input" in err and "Traceback" not in err
    assert sorted(p.name for p in data.iterdir()) == ["a.tif"]
