"""The tree stays one a newcomer can hold in their head: short modules and classes, no
private names crossing modules, a command line that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "napari_lsmfm"
MODULES = sorted(SRC.rglob("*.py"))
MAX_MODULE, MAX_WIDGET_MODULE, MAX_CLASS = 500, 300, 300


def _rel(path: Path) -> str:
    return str(path.relative_to(SRC.parent))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_modules_and_classes_are_short():
    too_long = []
    for path in MODULES:
        lines = len(path.read_text(encoding="utf-8").splitlines())
        limit = MAX_WIDGET_MODULE if path.parent.name == "widgets" else MAX_MODULE
        if lines > limit:
            too_long.append(f"{_rel(path)}: {lines} lines (at most {limit})")
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS:
                    too_long.append(f"{_rel(path)}: class {node.name} {size} lines")
    assert not too_long, "\n".join(too_long)


def test_no_private_name_crosses_a_module():
    found = []
    for path in MODULES:
        tree = _tree(path)
        modules: set[str] = set()  # names bound to imported modules
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                parts = (node.module or "").split(".")
                if node.module != "__future__" and any(_private(p) for p in parts):
                    found.append(f"{_rel(path)}:{node.lineno} from {node.module} import ...")
                for alias in node.names:
                    if _private(alias.name):
                        found.append(f"{_rel(path)}:{node.lineno} imports {alias.name}")
                    modules.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if any(_private(p) for p in alias.name.split(".")):
                        found.append(f"{_rel(path)}:{node.lineno} import {alias.name}")
                    modules.add((alias.asname or alias.name).split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in modules):
                found.append(f"{_rel(path)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("args", [["--help"], ["segment", "--help"], ["deblur", "--help"],
                                  ["pretrain", "--help"], ["sample", "--help"],
                                  ["train-deblur", "--help"], ["classify", "--help"]])
def test_command_line_help_needs_no_torch(args):
    code = (
        "import sys\n"
        f"sys.argv = ['lsmfm'] + {args!r}\n"
        "import napari_lsmfm.cli as c\n"
        "try:\n    c.main()\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'monai') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
