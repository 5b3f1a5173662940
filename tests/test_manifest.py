"""The npe2 manifest: valid, importable, and the very file the installed plugin uses."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_npe2_validate_with_imports():
    exe = Path(sys.executable).with_name("npe2")
    result = subprocess.run(
        [str(exe), "validate", "napari-lsmfm", "--imports"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in (result.stdout + result.stderr).lower()


def test_installed_manifest_is_the_top_level_file():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()  # a fresh process has not looked at the installed entry points yet
    manifest = pm.get_manifest("napari-lsmfm")
    # The installed plugin reads src/napari_lsmfm/napari.yaml, a link to ./napari.yaml.
    import napari_lsmfm

    installed = Path(napari_lsmfm.__file__).with_name("napari.yaml")
    assert installed.resolve() == (ROOT / "napari.yaml").resolve()
    top = yaml.safe_load((ROOT / "napari.yaml").read_text())
    assert manifest.name == top["name"] == "napari-lsmfm"
    ids = {c.id for c in manifest.contributions.commands}
    assert ids == {c["id"] for c in top["contributions"]["commands"]}
    assert all(i.startswith("napari-lsmfm.") for i in ids)


def test_every_widget_in_manifest_is_real():
    top = yaml.safe_load((ROOT / "napari.yaml").read_text())
    commands = {c["id"]: c["python_name"] for c in top["contributions"]["commands"]}
    import importlib

    for widget in top["contributions"]["widgets"]:
        module, attr = commands[widget["command"]].split(":")
        cls = getattr(importlib.import_module(module), attr)
        assert callable(cls)


@pytest.mark.slow
def test_wheel_ships_the_same_manifest_and_samples(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(tmp_path),
         str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("napari_lsmfm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        assert zf.read("napari_lsmfm/napari.yaml") == (ROOT / "napari.yaml").read_bytes()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        text = zf.read(entry_points).decode()
        assert "napari-lsmfm = napari_lsmfm:napari.yaml" in text
        assert "lsmfm = napari_lsmfm.cli:main" in text
        shipped = sorted(p.name for p in (ROOT / "sample_data").glob("*.tif"))
        assert shipped, "no sample data files"
        for name in shipped:
            assert f"napari_lsmfm/sample_data/{name}" in names
            assert zf.read(f"napari_lsmfm/sample_data/{name}") == (
                ROOT / "sample_data" / name
            ).read_bytes()
