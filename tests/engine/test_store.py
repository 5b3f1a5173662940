"""The one atomic writer: a result is under its name whole, or not at all."""

from __future__ import annotations

import pytest

from napari_lsmfm.engine.store import atomic_write


def test_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temporary left behind
    atomic_write(target, lambda tmp: tmp.write_text("new"), mode=0o644)
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o644


def test_folder_replaces_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "a").write_text("1")

    def write(tmp):
        tmp.mkdir()
        (tmp / "b").write_text("2")

    atomic_write(target, write)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
