"""A hostile trial of the ``lsmfm`` command line: bad images, brushes, weights, outputs,
kills, concurrency and memory, each case a real subprocess.

    python benchmarks/hostile_trial.py                 # every case, about 10 minutes on 2 cores
    python benchmarks/hostile_trial.py --only kill     # the cases whose kind or name has "kill"
    python benchmarks/hostile_trial.py --keep DIR      # keep the work folder for a look

Every case runs ``python -m napari_lsmfm.cli ...`` in one work folder under an address
space limit (``--memory-gb``, default 6: a run that asks for more gets a MemoryError,
never the machine), and is checked for

- its exit status: 2 with one line ``lsmfm CMD: error: ...`` for a refusal (the line
  must hold the case's words), 0 for a run that should work (its result is checked),
  -9 / 130 for a killed / interrupted one;
- a traceback on stderr, or a crash (any other exit status): counted in ``tracebacks``;
- a wrong result with exit status 0 (a refusal that ran, class values that wrapped, a
  payload that ran, a result unlike the reference): ``silent_wrong``;
- the sha256 of every file in the work folder before and after: a changed or vanished
  input or earlier output, or a new file under a user's name after a refusal or a kill,
  is a lost file (``lost_files``). Hidden temporaries (``.NAME.partial-*``) a kill -9
  leaves are allowed, but must be refused by ``open_volume``.

Prints a markdown table, then ``hostile-trial: cases=N tracebacks=T silent_wrong=S
lost_files=L`` as the last line (``unclear`` messages, wrong words, are in the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VOXEL = (2.0, 1.0, 1.0)
CLI = [sys.executable, "-m", "napari_lsmfm.cli"]


@dataclass
class Case:
    """One command and what it must do. ``expect``: "refuse" (exit 2, one line with
    ``words``), "ok" (exit 0, ``check`` passes), "either" (one of the two), "kill"
    (``signal`` once ``target``'s temporary exists, or after ``delay`` s)."""

    kind: str
    name: str
    argv: list[str]
    expect: str = "refuse"
    words: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()  # words the message must not hold
    outputs: tuple[str, ...] = ()  # what an ok run may write (removed after the case)
    check: Callable[[Path, str, str], str | None] | None = None  # -> problem or None
    before: Callable[[Path], None] | None = None
    signal: int | None = None
    target: str | None = None
    delay: float = 0.3
    twin: list[str] | None = None  # concurrency: run this at the same time
    timeout: float = 300.0
    max_seconds: float | None = None  # a refusal must come this fast (before any work)
    memory_gb: float | None = None


@dataclass
class Outcome:
    case: Case
    status: str
    verdict: str
    message: str
    traceback: bool = False
    silent_wrong: bool = False
    lost: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- files


def digest_tree(root: Path) -> dict[str, str]:
    """sha256 of every visible file under ``root`` (hidden temporaries left out)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") and (".partial-" in part or ".old-" in part
                                         or ".probe-" in part) for part in rel.parts):
            continue
        if path.is_file():
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_symlink():
            out[str(rel)] = "link->" + os.readlink(path)
    return out


def write(path: Path, data, **kw) -> None:
    from napari_lsmfm.io import write_volume

    write_volume(path, data, overwrite=True, **kw)


def make_files(w: Path) -> None:
    """The inputs every case works on, and the outputs earlier runs left."""
    import tifffile
    import zarr

    from napari_lsmfm.io.output import mark_partial
    from napari_lsmfm.synth import make_volume

    vol = make_volume("nuclei", (16, 64, 64), VOXEL, seed=3)
    write(w / "img.tif", vol.image, voxel_size=VOXEL)
    brushes = np.zeros(vol.image.shape, np.uint8)
    for z in (4, 8, 12):
        brushes[z][vol.labels[z] > 0] = 2
        brushes[z][vol.labels[z] == 0] = 1
    write(w / "brushes.tif", brushes, kind="labels")
    write(w / "img.zarr", vol.image, voxel_size=VOXEL)
    (w / "link.tif").symlink_to("img.tif")
    os.link(w / "img.tif", w / "hard.tif")
    write(w / "psf.tif", np.ones((5, 5, 5), np.float32) / 125)
    rng = np.random.default_rng(0)
    big = (rng.random((16, 128, 128)) * 1000 + 100).astype(np.uint16)
    write(w / "big.tif", big, voxel_size=VOXEL)
    bb = np.zeros(big.shape, np.uint8)
    bb[8, :40], bb[8, 80:] = 1, 2
    write(w / "big_brushes.tif", bb, kind="labels")
    write(w / "existing.tif", np.ones((4, 8, 8), np.uint16))
    write(w / "existing.zarr", np.ones((16, 64, 64), np.uint16))
    write(w / "partial.zarr", np.ones((16, 64, 64), np.uint16))
    mark_partial(w / "partial.zarr", command="predict", resumable=True)
    (w / "foreign.zarr").mkdir()
    (w / "foreign.zarr" / "notes.txt").write_text("my notes")
    (w / "foreign").mkdir()
    (w / "foreign" / "notes.txt").write_text("my notes")
    (w / "emptydir").mkdir()
    (w / "notzarr").mkdir()
    (w / "notzarr" / "a.txt").write_text("x")
    shutil.copytree(ROOT / "src/napari_lsmfm/model/default", w / "fm")

    # bad images
    write(w / "plane.tif", vol.image[0])
    tifffile.imwrite(w / "rgb.tif", np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    write(w / "czyx.tif", np.stack([vol.image, vol.image]))
    tifffile.imwrite(w / "tzyx.tif", np.stack([vol.image] * 3)[:, :, None], imagej=True,
                     metadata={"axes": "TZCYX"})
    (w / "empty.tif").write_bytes(b"")
    data = (w / "img.tif").read_bytes()
    (w / "truncated.tif").write_bytes(data[: len(data) // 3])
    (w / "text.tif").write_text("this is not an image\n")
    zarr.open(str(w / "zero.zarr"), mode="w", shape=(0, 32, 32), dtype="uint16")
    write(w / "one.tif", np.ones((1, 1, 1), np.uint16))
    nan = vol.image.astype(np.float32)
    nan[3, 3, 3] = np.nan
    write(w / "nan.tif", nan)
    write(w / "huge_values.tif", vol.image.astype(np.float32) * 1e7)
    zarr.open(str(w / "complex.zarr"), mode="w", shape=(16, 64, 64), dtype="complex64")[:] = 1j
    write(w / "const.tif", np.full((16, 64, 64), 7, np.uint16))
    with_warnings_quiet(lambda: tifffile.imwrite(w / "three.tif", vol.image[:3]))
    write(w / "parsec.zarr", vol.image, voxel_size=VOXEL)
    attrs = json.loads((w / "parsec.zarr" / ".zattrs").read_text())
    for axis in attrs["multiscales"][0]["axes"]:
        axis["unit"] = "parsec"
    (w / "parsec.zarr" / ".zattrs").write_text(json.dumps(attrs))
    (w / "pic.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    write(w / "flat3.tif", (rng.random((3, 512, 512)) * 1000).astype(np.uint16))

    write(w / "plain.tif", vol.image)  # no voxel size
    write(w / "psf0.tif", np.zeros((5, 5, 5), np.float32))
    write(w / "psfbig.tif", np.ones((40, 200, 200), np.float32))
    (w / "badfm").mkdir()
    shutil.copy(w / "fm" / "config.json", w / "badfm" / "config.json")
    (w / "badfm" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")

    # bad brushes
    bh = brushes.astype(np.uint64)
    bh[bh == 2] = 2**40
    zarr.open(str(w / "b_huge.zarr"), mode="w", shape=bh.shape, dtype="uint64")[:] = bh
    write(w / "b_shape.tif", brushes[:, :32], kind="labels")
    write(w / "b_background.tif", np.where(brushes > 0, 1, 0).astype(np.uint8), kind="labels")
    write(w / "b_none.tif", np.zeros_like(brushes), kind="labels")
    b7 = brushes.astype(np.uint32)
    b7[b7 == 2] = 70000
    write(w / "b_70000.tif", b7, kind="labels")
    write(w / "b_float.tif", brushes.astype(np.float32) / 2)
    write(w / "b_negative.tif", brushes.astype(np.int16) - 1, kind="labels")
    many = brushes.astype(np.uint16)
    many[4] = np.arange(64 * 64).reshape(64, 64) % 100 + 1
    write(w / "b_many.tif", many, kind="labels")
    write(w / "b_2d.tif", brushes[4], kind="labels")

    # bad weights
    (w / "w_trunc.ckpt").write_bytes(b"PK\x03\x04 truncated zip")
    (w / "w_random.ckpt").write_bytes(rng.bytes(4096))
    (w / "w_text.ckpt").write_text("weights\n")
    with open(w / "w_pickle.ckpt", "wb") as f:
        pickle.dump(Payload(str(w / "PWNED")), f)
    import torch

    torch.save({"state_dict": {}, "hyper_parameters": Payload(str(w / "PWNED"))},
               w / "w_torch.ckpt")
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from _checkpoints import make_lightning_checkpoint

        def drop_three(state):
            for key in [k for k in state if k.startswith("student_encoder.")][:3]:
                del state[key]

        make_lightning_checkpoint(w / "w_keys.ckpt", arch="swinunetr", use_text=False,
                                  edit_state=drop_three)
    except Exception as err:  # noqa: BLE001 - the tests' builder is optional here
        print(f"(no published-style checkpoint: {err})", file=sys.stderr)


class Payload:
    """Unpickling this runs ``touch PATH``: what a hostile checkpoint does."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def with_warnings_quiet(fn):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


def read_only_folder(w: Path) -> Path:
    folder = w / "ro"
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
    elif shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(folder)], check=False, capture_output=True)
    return folder


def undo_read_only(w: Path) -> None:
    folder = w / "ro"
    if folder.exists():
        if shutil.which("chattr"):
            subprocess.run(["chattr", "-i", str(folder)], check=False, capture_output=True)
        folder.chmod(0o755)


# --------------------------------------------------------------------------- checks


def opens(name: str, shape=None, *, equal: str | None = None, max_value=None):
    """A check: ``name`` opens (not partial), of ``shape``, equal to ``equal``'s data."""

    def check(w: Path, out: str, err: str) -> str | None:
        from napari_lsmfm.io import open_volume

        try:
            vol = open_volume(w / name)
        except Exception as exc:  # noqa: BLE001
            return f"{name} does not open: {exc}"
        data = np.asarray(vol.data)
        if shape is not None and data.shape != tuple(shape):
            return f"{name} has shape {data.shape}, expected {tuple(shape)}"
        if equal is not None and not np.array_equal(data, np.asarray(open_volume(w / equal).data)):
            return f"{name} differs from {equal}"
        if max_value is not None and int(data.max()) != max_value:
            return f"{name} holds {int(data.max())} at most, expected {max_value}"
        return None

    return check


def summary_says(key: str, value):
    def check(w: Path, out: str, err: str) -> str | None:
        try:
            got = json.loads(out.strip().splitlines()[-1]).get(key)
        except (ValueError, IndexError):
            return "no JSON summary"
        return None if got == value else f"summary {key}={got!r}, expected {value!r}"

    return check


def both(*checks):
    def check(w: Path, out: str, err: str) -> str | None:
        for c in checks:
            problem = c(w, out, err)
            if problem:
                return problem
        return None

    return check


def stderr_says(*words: str):
    def check(w: Path, out: str, err: str) -> str | None:
        missing = [x for x in words if x.lower() not in err.lower()]
        return f"stderr lacks {missing}" if missing else None

    return check


def no_temporaries(name: str):
    def check(w: Path, out: str, err: str) -> str | None:
        left = [p.name for p in w.glob(f".{name}.partial-*")]
        return f"{left[0]} left behind" if left else None

    return check


def no_payload(w: Path, out: str, err: str) -> str | None:
    return "the pickle payload ran" if (w / "PWNED").exists() else None


def make_old(name: str, value: int = 5, shape=(16, 128, 128)):
    def before(w: Path) -> None:
        write(w / name, np.full(shape, value, np.uint16))

    return before


# --------------------------------------------------------------------------- cases

SEG = ["segment", "img.tif", "--labels", "brushes.tif", "--steps", "10", "--quiet"]
APPLY = ["segment", "img.tif", "--model", "model", "--quiet"]
RL = ["deblur", "img.tif", "--method", "rl", "--psf-sigma", "2,1,1", "--iterations", "2",
      "--quiet"]
SLOW_RL = ["deblur", "big.tif", "--method", "rl", "--psf-sigma", "2,1,1", "--iterations",
           "60", "--tile", "8,32,32", "--quiet"]
# a saved model computes the features window by window: seconds of writing
SLOW_SEG = ["segment", "big.tif", "--model", "model", "--tile", "8,32,32", "--quiet"]


def image_cases() -> list[Case]:
    """Bad images: damaged, 2D, RGB, channels, empty, NaN, partial."""
    out: list[Case] = []

    def one_image(name: str, words: tuple[str, ...], seg_too: bool = True,
                    absent: tuple[str, ...] = ()) -> None:
        out.append(Case("image", f"deblur {name}", ["deblur", name, "--out", "o.tif",
                                                    "--method", "rl", "--psf-sigma", "2",
                                                    "--quiet"], words=words, absent=absent))
        if seg_too:
            out.append(Case("image", f"segment {name}", ["segment", name, "--model", "model",
                                                         "--out", "o.tif", "--quiet"],
                            words=words, absent=absent))

    one_image("missing.tif", ("does not exist",))
    one_image("plane.tif", ("2D",))
    one_image("rgb.tif", ("RGB",))
    one_image("czyx.tif", ("channel", "command line"))
    one_image("tzyx.tif", ("time series",))
    one_image("empty.tif", ("empty.tif",))
    one_image("truncated.tif", ("truncated.tif",))
    one_image("text.tif", ("text.tif",))
    one_image("zero.zarr", ("no pixels",))
    one_image("one.tif", ("single voxel",), absent=("2D",))
    one_image("nan.tif", ("NaN",))
    one_image("huge_values.tif", ("values",), seg_too=False)
    one_image("complex.zarr", ("complex",))
    one_image("notzarr", ("not a Zarr",))
    one_image("pic.png", ("not a supported",))
    one_image("partial.zarr", ("partial output of an interrupted run",))
    one_image("const.tif", ("constant",), seg_too=False)
    out += [
        Case("image", "segment const.tif (warns)", ["segment", "const.tif", "--labels",
             "brushes.tif", "--steps", "5", "--out", "o.tif", "--quiet"], expect="ok",
             outputs=("o.tif",), check=stderr_says("constant")),
        Case("image", "deblur three.tif (3 planes, tagged RGB)", RL[:1] + ["three.tif"] + RL[2:]
             + ["--out", "o.tif"], expect="ok", outputs=("o.tif",),
             check=opens("o.tif", (3, 64, 64))),
        Case("image", "parsec unit is not read as um", ["deblur", "parsec.zarr", "--out",
             "o.tif", "--method", "rl", "--psf-sigma", "2,1,1", "--psf-unit", "um", "--quiet"],
             words=("voxel size",)),
        Case("image", "segment 3 x 512 x 512 (no 64-plane padding cost)", ["segment",
             "flat3.tif", "--model", "model", "--out", "o.zarr", "--quiet"], expect="ok",
             outputs=("o.zarr",), check=opens("o.zarr", (3, 512, 512)), timeout=240),
    ]
    return out


def brush_cases() -> list[Case]:
    """Bad brushes: what a user paints."""
    out: list[Case] = []
    def brush_case(name: str, words: tuple[str, ...]) -> None:
        out.append(Case("brushes", name, ["segment", "img.tif", "--labels", name, "--steps",
                                          "5", "--out", "o.tif", "--quiet"], words=words))

    brush_case("b_shape.tif", ("shape",))
    brush_case("b_background.tif", ("one class is not enough",))
    brush_case("b_none.tif", ())
    brush_case("b_float.tif", ())
    brush_case("b_negative.tif", ())
    brush_case("b_many.tif", ("label values",))
    brush_case("b_2d.tif", ())
    brush_case("missing.tif", ("does not exist",))
    out.append(Case("brushes", "b_70000.tif kept as 70000", ["segment", "img.tif", "--labels",
                    "b_70000.tif", "--steps", "10", "--out", "o.tif", "--quiet"], expect="ok",
                    outputs=("o.tif",), check=both(opens("o.tif", max_value=70000),
                                                   summary_says("classes", [70000]))))
    return out


def weight_cases() -> list[Case]:
    """Bad weights: files that are not foundation weights."""
    out: list[Case] = []
    def weights_case(name: str, words: tuple[str, ...] = (), absent=()) -> None:
        out.append(Case("weights", f"--weights {name}", SEG[:1] + ["img.tif", "--labels",
                        "brushes.tif", "--weights", name, "--out", "o.tif", "--quiet"],
                        words=words, absent=absent, check=no_payload))

    weights_case("missing.ckpt")
    weights_case("w_trunc.ckpt")
    weights_case("w_random.ckpt")
    weights_case("w_text.ckpt")
    weights_case("w_pickle.ckpt", ("system",), absent=("will likely succeed",))
    weights_case("w_torch.ckpt", ("system",))
    weights_case("w_keys.ckpt", ("missing",), absent=("neither a SwinUNETR nor a UNet",))
    weights_case("img.tif")
    weights_case("emptydir")
    weights_case(str(ROOT / "src/napari_lsmfm/model/default_deblur"))
    out += [
        Case("weights", "segment --model (a deblur model)", ["segment", "img.tif", "--model",
             str(ROOT / "src/napari_lsmfm/model/default_deblur"), "--out", "o.tif", "--quiet"],
             words=("deblur",)),
        Case("weights", "deblur --weights (a segment model)", ["deblur", "img.tif",
             "--weights", "model", "--out", "o.tif", "--quiet"], words=("'deblur' model",)),
        Case("weights", "info w_pickle.ckpt", ["info", "w_pickle.ckpt"], words=("system",),
             check=no_payload),
        Case("weights", "info on a TIFF", ["info", "img.tif"], absent=("text file",)),
        Case("weights", "info --vocab missing", ["info", "--vocab", "missing.txt"],
             words=("missing.txt",)),
    ]
    return out


def output_cases() -> list[Case]:
    """Outputs: an input, a link, a read-only folder, a partial one."""
    out: list[Case] = []
    def output_case(name, argv, words, **kw) -> None:
        out.append(Case("output", name, argv, words=words, **kw))

    output_case("--out = image", SEG + ["--out", "img.tif"], ("is the image",))
    output_case("--out = image, --overwrite", SEG + ["--out", "img.tif", "--overwrite"],
                ("is the image",))
    output_case("--out = brushes, --overwrite", SEG + ["--out", "brushes.tif", "--overwrite"],
                ("is the brushes",))
    output_case("--out = link to image", SEG + ["--out", "link.tif", "--overwrite"],
                ("is the image",))
    output_case("--out = hard link to image", SEG + ["--out", "hard.tif", "--overwrite"],
                ("is the image",))
    output_case("deblur zarr --out itself", ["deblur", "img.zarr", "--out", "img.zarr",
                "--overwrite", "--quiet"], ("is the image",))
    output_case("deblur zarr/0 --out its group", ["deblur", "img.zarr/0", "--out", "img.zarr",
                "--overwrite", "--quiet"], ("holds the image",))
    output_case("--out inside the input zarr", ["deblur", "img.zarr", "--out",
                "img.zarr/labels.zarr", "--quiet"], ("lies inside",))
    output_case("--out in the input's zarr group", ["deblur", "img.zarr/0", "--out",
                "img.zarr/s.zarr", "--quiet"], ("Zarr group",))
    output_case("--save-model . (holds the inputs)", SEG + ["--out", "o.tif", "--save-model",
                ".", "--overwrite"], ("holds",))
    output_case("--out inside --model", APPLY + ["--out", "model/x.zarr"],
                ("lies inside the model",))
    output_case("--out inside --weights", SEG + ["--weights", "fm", "--out", "fm/x.tif"],
                ("lies inside the weights",))
    output_case("--out = --psf-file", ["deblur", "img.tif", "--method", "rl", "--psf-file",
                "psf.tif", "--out", "psf.tif", "--overwrite", "--quiet"], ("is the PSF",))
    output_case("--out folder missing", RL + ["--out", "nowhere/x.tif"], ("does not exist",))
    output_case("--out in a read-only folder", RL + ["--out", "ro/x.tif"],
                ("cannot write", "ro/x.tif"), absent=(".partial", ".probe"),
                before=read_only_folder)
    output_case("--save-model in a read-only folder (before training)",
                SEG + ["--out", "o.tif", "--save-model", "ro/m"], ("cannot write", "ro/m"),
                absent=(".partial",), before=read_only_folder, max_seconds=12)
    output_case("--out x.png", RL + ["--out", "x.png"], (".tif, .tiff or .zarr",))
    output_case("--out existing, no --overwrite", RL + ["--out", "existing.tif"],
                ("already exists",))
    output_case("--out a partial output", RL + ["--out", "partial.zarr"],
                ("partial output of an interrupted run: rerun with --overwrite",))
    output_case("two outputs, one file", SEG + ["--out", "a.tif", "--probabilities", "a.tif"],
                ("same place",))
    output_case("an output inside another", SEG + ["--out", "a.zarr", "--probabilities",
                "a.zarr/p.zarr"], ("same place",))
    output_case("--overwrite a foreign folder", RL + ["--out", "foreign.zarr", "--overwrite"],
                ("will not replace",))
    output_case("--save-model over a foreign folder", SEG + ["--out", "o.tif", "--save-model",
                "foreign", "--overwrite"], ("will not replace",))
    output_case("--out under a file", RL + ["--out", "img.tif/x.tif"], ("img.tif",))
    out += [
        Case("output", "--overwrite an old zarr (whole)", RL + ["--out", "existing.zarr",
             "--overwrite"], expect="ok", outputs=("existing.zarr",),
             check=opens("existing.zarr", (16, 64, 64)),
             before=lambda w: write(w / "existing.zarr", np.ones((16, 64, 64), np.uint16))),
        Case("output", "--overwrite a partial output", RL + ["--out", "partial.zarr",
             "--overwrite"], expect="ok", outputs=("partial.zarr",),
             check=opens("partial.zarr", (16, 64, 64)), before=remark_partial),
    ]

    # more outputs: every option, every command
    for option in ("--probabilities", "--uncertainty", "--instances"):
        output_case(f"{option} = image", SEG + ["--out", "o.tif", option, "img.tif",
                    "--overwrite"], ("is the image",))
        output_case(f"{option} = brushes via link", SEG + ["--out", "o.tif", option,
                    "blink.tif", "--overwrite"], ("is the brushes",), before=brush_link)
    output_case("--save-model = --weights folder", SEG + ["--weights", "fm", "--out", "o.tif",
                "--save-model", "fm", "--overwrite"], ("is the weights",))
    output_case("--out = --model folder", APPLY + ["--out", "model", "--overwrite"],
                ("is the model",))
    output_case("--out = a folder named .tif", RL + ["--out", "foreign.tif", "--overwrite"],
                ("will not replace",), before=foreign_tif)
    output_case("sample into existing files", ["sample", "setup"], ("already exists",),
                before=lambda w: write(w / "setup" / "nuclei.tif", np.ones((2, 4, 4), np.uint8)))
    output_case("sample into a read-only folder", ["sample", "ro"], ("ro",),
                before=read_only_folder)
    output_case("train-deblur --out = a folder of inputs", ["train-deblur", "--out", ".",
                "--steps", "1", "--overwrite"], ())
    output_case("pretrain --out in a read-only folder", ["pretrain", "--synthetic", "--out",
                "ro/run", "--steps", "1"], ("ro",), before=read_only_folder)
    return out


def option_cases() -> list[Case]:
    """Options: numbers out of range, missing files."""
    out: list[Case] = []
    # options
    def option_case(name, argv, words=()) -> None:
        out.append(Case("options", name, argv, words=words))

    option_case("--voxel-size 0,1,1", RL + ["--out", "o.tif", "--voxel-size", "0,1,1"],
                ("voxel-size",))
    option_case("--voxel-size a,b,c", RL + ["--out", "o.tif", "--voxel-size", "a,b,c"],
                ("voxel-size",))
    option_case("--psf-sigma -1", ["deblur", "img.tif", "--method", "rl", "--psf-sigma", "-1",
                "--out", "o.tif", "--quiet"], ("psf-sigma",))
    option_case("--psf-sigma nan", ["deblur", "img.tif", "--method", "rl", "--psf-sigma",
                "nan,1,1", "--out", "o.tif", "--quiet"], ("psf",))
    option_case("--iterations 0", RL + ["--out", "o.tif", "--iterations", "0"], ("iterations",))
    option_case("--psf-file missing", ["deblur", "img.tif", "--method", "rl", "--psf-file",
                "nopsf.tif", "--out", "o.tif", "--quiet"], ("nopsf.tif",))
    option_case("--psf-file a 2D image", ["deblur", "img.tif", "--method", "rl", "--psf-file",
                "plane.tif", "--out", "o.tif", "--quiet"], ("plane.tif",))
    option_case("--psf-file all zeros", ["deblur", "img.tif", "--method", "rl", "--psf-file",
                "psf0.tif", "--out", "o.tif", "--quiet"], ("psf",))
    out.append(Case("options", "--psf-file larger than the image", ["deblur", "img.tif",
                    "--method", "rl", "--psf-file", "psfbig.tif", "--out", "o.tif", "--quiet"],
                    expect="either", words=("psf",), outputs=("o.tif",),
                    check=opens("o.tif", (16, 64, 64))))
    option_case("--steps 0", SEG + ["--steps", "0", "--out", "o.tif"], ("steps",))
    option_case("--steps -5", SEG + ["--steps", "-5", "--out", "o.tif"], ("steps",))
    option_case("--quick-weight 2", APPLY + ["--quick-weight", "2", "--out", "o.tif"],
                ("quick",))
    option_case("--instance-classes x", SEG + ["--out", "o.tif", "--instances", "i.tif",
                "--instance-classes", "x"], ("instance-classes",))
    option_case("--labels and --model", SEG + ["--model", "model", "--out", "o.tif"],
                ("either",))
    option_case("--device bogus", SEG + ["--device", "bogus", "--out", "o.tif"], ("device",))
    option_case("--device cuda:7", SEG + ["--device", "cuda:7", "--out", "o.tif"], ("cuda",))
    option_case("--iterations with the model", ["deblur", "img.tif", "--iterations", "3",
                "--out", "o.tif", "--quiet"], ("iterations",))
    option_case("--psf-unit um without a voxel size", ["deblur", "plain.tif", "--method", "rl",
                "--psf-sigma", "2", "--psf-unit", "um", "--out", "o.tif", "--quiet"],
                ("voxel size",))
    option_case("brushes 2**40", ["segment", "img.tif", "--labels", "b_huge.zarr", "--out",
                "o.tif", "--quiet"], ("larger than",))
    out.append(Case("options", "brushes in a partial zarr", ["segment", "img.tif", "--labels",
                    "partial.zarr", "--out", "o.tif", "--quiet"], words=("partial output",),
                    before=remark_partial))
    option_case("--weights: broken safetensors", SEG + ["--weights", "badfm", "--out", "o.tif"],
                ("badfm",))
    option_case("--model: empty folder", ["segment", "img.tif", "--model", "emptydir", "--out",
                "o.tif", "--quiet"], ("emptydir",))
    out.append(Case("options", "pretrain --resume in an empty folder", ["pretrain",
                "--synthetic", "--synthetic-volumes", "2", "--out", "fresh_run", "--resume",
                "--steps", "1", "--patch-size", "16", "--batch-size", "1", "--threads", "1"],
                expect="either", outputs=("fresh_run",),
                check=lambda w, o, e: None if "no checkpoint" in (o + e) else
                "--resume in an empty folder said nothing", timeout=300))
    return out


def kill_cases() -> list[Case]:
    """Kills: the temporary exists, then the signal."""
    out: list[Case] = []
    # kills: the temporary exists, then the signal
    out += [
        Case("kill", "kill -9 deblur, new zarr", SLOW_RL + ["--out", "new.zarr"],
             expect="kill", signal=signal.SIGKILL, target="new.zarr"),
        Case("kill", "rerun after kill -9 (no 'already exists', swept)", RL + ["--out",
             "new.zarr"], expect="ok", outputs=("new.zarr",),
             check=both(opens("new.zarr", (16, 64, 64)), no_temporaries("new.zarr"))),
        Case("kill", "kill -9 deblur --overwrite", SLOW_RL + ["--out", "old.zarr",
             "--overwrite"], expect="kill", signal=signal.SIGKILL, target="old.zarr",
             before=make_old("old.zarr"), outputs=("old.zarr",)),
        Case("kill", "Ctrl-C deblur --overwrite", SLOW_RL + ["--out", "old.zarr",
             "--overwrite"], expect="kill", signal=signal.SIGINT, target="old.zarr",
             before=make_old("old.zarr"), outputs=("old.zarr",)),
        Case("kill", "SIGTERM deblur --overwrite", SLOW_RL + ["--out", "old.zarr",
             "--overwrite"], expect="kill", signal=signal.SIGTERM, target="old.zarr",
             before=make_old("old.zarr"), outputs=("old.zarr",)),
        Case("kill", "kill -9 deblur, tif output", SLOW_RL + ["--out", "new.tif"],
             expect="kill", signal=signal.SIGKILL, delay=3.5),
        Case("kill", "kill -9 deblur model", ["deblur", "big.tif", "--tile", "16,16,16",
             "--out", "m.zarr", "--quiet"], expect="kill", signal=signal.SIGKILL,
             target="m.zarr"),
        Case("kill", "kill -9 segment --overwrite", SLOW_SEG + ["--out", "k.zarr",
             "--overwrite"], expect="kill", signal=signal.SIGKILL, target="k.zarr",
             before=make_old("k.zarr"), outputs=("k.zarr",)),
        Case("kill", "Ctrl-C segment, new zarr", SLOW_SEG + ["--out", "k2.zarr"],
             expect="kill", signal=signal.SIGINT, target="k2.zarr"),
        Case("kill", "SIGTERM segment --overwrite", SLOW_SEG + ["--out", "k.zarr",
             "--overwrite"], expect="kill", signal=signal.SIGTERM, target="k.zarr",
             before=make_old("k.zarr"), outputs=("k.zarr",)),
        Case("kill", "kill -9 segment, tif --overwrite", SLOW_SEG + ["--out", "k.tif",
             "--probabilities", "p.zarr", "--overwrite"], expect="kill",
             signal=signal.SIGKILL, target="p.zarr", before=make_old("k.tif"),
             outputs=("k.tif", "p.zarr")),
        Case("kill", "Ctrl-C while training", ["segment", "big.tif", "--labels",
             "big_brushes.tif", "--steps", "100000", "--out", "t.zarr", "--quiet"],
             expect="kill", signal=signal.SIGINT, delay=8.0),
    ]
    return out


def concurrency_cases() -> list[Case]:
    """Concurrency: two runs, one output."""
    out: list[Case] = []
    # concurrency: two runs, one output
    ref = ["deblur", "big.tif", "--method", "rl", "--psf-sigma", "2,1,1", "--iterations", "20",
           "--quiet"]
    out += [
        Case("concurrency", "two deblurs, one new zarr", ref + ["--out", "same.zarr"],
             twin=ref + ["--out", "same.zarr"], expect="ok", outputs=("same.zarr",),
             check=opens("same.zarr", equal="setup/ref.zarr")),
        Case("concurrency", "two deblurs, one zarr, --overwrite",
             ref + ["--out", "same.zarr", "--overwrite"],
             twin=ref + ["--out", "same.zarr", "--overwrite"], expect="ok",
             outputs=("same.zarr",), check=opens("same.zarr", equal="setup/ref.zarr"),
             before=make_old("same.zarr")),
        Case("concurrency", "two segments, one tif", APPLY + ["--out", "same.tif"],
             twin=APPLY + ["--out", "same.tif"], expect="ok", outputs=("same.tif",),
             check=opens("same.tif", equal="setup/classes.tif")),
    ]
    return out


def memory_cases() -> list[Case]:
    """Memory: huge windows and kernels, a low memory limit."""
    out: list[Case] = []
    # memory
    out += [
        Case("memory", "--tile 4096,4096,4096 (segment)", APPLY + ["--tile", "4096,4096,4096",
             "--out", "o.tif"], expect="either", outputs=("o.tif",),
             check=opens("o.tif", (16, 64, 64))),
        Case("memory", "--tile 1,1,1", SEG + ["--tile", "1,1,1", "--out", "o.tif"],
             words=("tile",)),
        Case("memory", "--tile 0,64,64", SEG + ["--tile", "0,64,64", "--out", "o.tif"],
             words=("tile",)),
        Case("memory", "--psf-sigma 1000,1000,1000 (rl)", ["deblur", "img.tif", "--method",
             "rl", "--psf-sigma", "1000,1000,1000", "--out", "o.tif", "--quiet"],
             expect="either", outputs=("o.tif",), check=opens("o.tif", (16, 64, 64))),
        Case("memory", "--tile 4096,4096,4096 (deblur model)", ["deblur", "img.tif", "--tile",
             "4096,4096,4096", "--out", "o.tif", "--quiet"], expect="either",
             outputs=("o.tif",), check=opens("o.tif", (16, 64, 64))),
        Case("memory", "segment 3 x 2000 x 2000 under 3 GB", ["segment", "huge3.tif",
             "--model", "model", "--tile", "4096,4096,4096", "--out", "o.zarr", "--quiet"],
             expect="either", outputs=("o.zarr",), check=opens("o.zarr", (3, 2000, 2000)),
             before=make_huge, memory_gb=3, timeout=300),
        Case("memory", "deblur rl 3 x 2000 x 2000 under 3 GB", ["deblur", "huge3.tif",
             "--method", "rl", "--psf-sigma", "2,1,1", "--iterations", "2", "--out", "o.zarr",
             "--quiet"], expect="either", outputs=("o.zarr",),
             check=opens("o.zarr", (3, 2000, 2000)), before=make_huge, memory_gb=3),
    ]
    return out


def cases() -> list[Case]:
    """Every case, in the order they run (kills after the outputs they may leave)."""
    return [*image_cases(), *brush_cases(), *weight_cases(), *output_cases(), *option_cases(),
            *kill_cases(), *concurrency_cases(), *memory_cases()]


def brush_link(w: Path) -> None:
    if not (w / "blink.tif").is_symlink():
        (w / "blink.tif").symlink_to("brushes.tif")


def foreign_tif(w: Path) -> None:
    (w / "foreign.tif").mkdir(exist_ok=True)
    (w / "foreign.tif" / "notes.txt").write_text("mine")


def remark_partial(w: Path) -> None:
    from napari_lsmfm.io.output import mark_partial

    write(w / "partial.zarr", np.ones((16, 64, 64), np.uint16))
    mark_partial(w / "partial.zarr", command="predict", resumable=True)


def make_huge(w: Path) -> None:
    if not (w / "huge3.tif").exists():
        rng = np.random.default_rng(2)
        write(w / "huge3.tif", (rng.random((3, 2000, 2000)) * 1000).astype(np.uint16))


# --------------------------------------------------------------------------- running


def limit_memory(gb: float):
    def apply() -> None:
        limit = int(gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def start(argv: list[str], w: Path, gb: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LSMFM_DEBUG", None)
    return subprocess.Popen(CLI + argv, cwd=w, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=limit_memory(gb))


def wait_then_signal(proc: subprocess.Popen, w: Path, case: Case) -> bool:
    """Send the case's signal once its output's temporary exists (or after its delay);
    False when the run ended first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < case.timeout:
        if proc.poll() is not None:
            return False
        if case.target is None:
            if time.monotonic() - t0 >= case.delay:
                break
        elif any((p / "0" / ".zarray").is_file() for p in w.glob(f".{case.target}.partial-*")):
            time.sleep(case.delay)
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        return False
    proc.send_signal(case.signal)
    return True


def hidden_temporaries(w: Path) -> list[Path]:
    return [p for p in w.iterdir() if p.name.startswith(".") and ".partial-" in p.name]


def run_case(case: Case, w: Path, gb: float) -> Outcome:
    if case.before is not None:
        case.before(w)
    before = digest_tree(w)
    gb = case.memory_gb or gb
    t0 = time.monotonic()
    procs = [start(case.argv, w, gb)]
    if case.twin is not None:
        procs.append(start(case.twin, w, gb))
    killed = None
    if case.signal is not None:
        killed = wait_then_signal(procs[0], w, case)
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=case.timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(timeout)"
        results.append((proc.returncode, out, err))
    seconds = time.monotonic() - t0
    after = digest_tree(w)
    codes = [r[0] for r in results]
    out = results[0][1]
    err = "\n".join(r[2] for r in results)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    message = lines[0] if lines else ""
    traceback = "Traceback" in err or "(timeout)" in err

    allowed = set(case.outputs) if case.expect in ("ok", "either") else set()
    changed = [k for k, v in before.items() if after.get(k) != v
               and not any(k == a or k.startswith(a + "/") for a in allowed)]
    debris = [k for k in after if k not in before
              and not any(k == a or k.startswith(a + "/") for a in allowed)]
    lost = changed + [f"{k} (new, under the user's name)" for k in debris]

    status = ",".join(str(c) for c in codes)
    silent = False
    verdict = ""
    if case.expect == "kill":
        if not killed or out.strip():  # the summary is printed after the outputs are in place
            verdict = "finished before the signal"
            lost = [k for k in lost if not (case.target and k.startswith(case.target))]
        elif case.signal == signal.SIGKILL:
            verdict = "killed" if codes[0] == -9 else f"exit {codes[0]}"
            for tmp in hidden_temporaries(w):  # what a kill -9 leaves must not open
                if not refused_by_reader(tmp):
                    silent, verdict = True, f"{tmp.name} opens as a volume"
        else:
            leftover = [p for p in hidden_temporaries(w)
                        if case.target and p.name.startswith(f".{case.target}.")]
            if codes[0] != 130 or "interrupted" not in err:
                verdict = f"exit {codes[0]}, not 'interrupted'"
                traceback = traceback or codes[0] not in (130, 2)
            elif leftover:
                verdict = f"left {leftover[0].name}"
            else:
                verdict = "interrupted, cleaned up"
    else:
        ok_codes = {"refuse": (2,), "ok": (0,), "either": (0, 2)}[case.expect]
        if any(c not in (0, 2) for c in codes):
            traceback = True
            verdict = f"crash (exit {status})"
        elif case.twin is not None:
            if 0 not in codes:
                verdict = "neither run finished"
        elif codes[0] not in ok_codes:
            if codes[0] == 0:
                silent, verdict = True, "ran instead of refusing"
            else:
                verdict = "refused a valid run"
        problem = None
        if not verdict and 0 in codes and case.check is not None:
            problem = case.check(w, out, err)
        elif not verdict and case.check is no_payload:
            problem = no_payload(w, out, err)
        if problem:
            silent, verdict = True, problem
        if not verdict and codes[0] == 2 and case.twin is None:
            low = message.lower()
            bad_words = [x for x in case.words if x.lower() not in low]
            bad_words += [f"not {x!r}" for x in case.absent if x.lower() in low]
            if len(lines) != 1 or not message.startswith("lsmfm "):
                verdict = f"unclear: {len(lines)} lines"
            elif bad_words:
                verdict = f"unclear: wants {bad_words}"
            elif case.max_seconds is not None and seconds > case.max_seconds:
                verdict = f"slow refusal ({seconds:.0f} s)"
            else:
                verdict = "refused"
        if not verdict:
            verdict = "ok" if 0 in codes else "refused"
    if traceback and "Traceback" in err:
        tail = [ln for ln in err.splitlines() if ln.strip()][-1]
        message = f"TRACEBACK ... {tail}"
    if lost:
        verdict += f"; LOST {len(lost)}: {lost[0]}"
    cleanup(case, w)
    return Outcome(case, status, verdict, message, traceback, silent, lost)


def refused_by_reader(path: Path) -> bool:
    from napari_lsmfm.io import open_volume

    try:
        open_volume(path)
    except Exception:  # noqa: BLE001 - any refusal will do
        return True
    return False


def cleanup(case: Case, w: Path) -> None:
    from napari_lsmfm.engine.store import remove_path

    for name in (*case.outputs, "o.tif", "o.zarr", "new.tif", "a.tif", "a.zarr", "i.tif",
                 "t.zarr", "fresh_run"):
        remove_path(w / name)
    # what a kill -9 left stays: the next run on that name must sweep it
    (w / "PWNED").unlink(missing_ok=True)
    undo_read_only(w)


def setup(w: Path, gb: float) -> None:
    make_files(w)
    (w / "setup").mkdir()
    steps = [
        ["segment", "img.tif", "--labels", "brushes.tif", "--steps", "20", "--save-model",
         "model", "--out", "setup/classes.tif", "--quiet"],
        ["deblur", "big.tif", "--method", "rl", "--psf-sigma", "2,1,1", "--iterations", "20",
         "--out", "setup/ref.zarr", "--quiet"],
    ]
    for argv in steps:
        proc = start(argv, w, gb)
        out, err = proc.communicate(timeout=600)
        if proc.returncode != 0:
            raise SystemExit(f"setup failed: {' '.join(argv)}\n{err}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="run the cases whose kind or name has this")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it")
    parser.add_argument("--memory-gb", type=float, default=6.0,
                        help="address-space limit of every run (GiB)")
    args = parser.parse_args()
    w = Path(args.keep or tempfile.mkdtemp(prefix="lsmfm-trial-")).resolve()
    w.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        setup(w, args.memory_gb)
        selected = [c for c in cases() if args.only is None
                    or args.only.lower() in f"{c.kind} {c.name}".lower()]
        outcomes = []
        for i, case in enumerate(selected, 1):
            outcome = run_case(case, w, args.memory_gb)
            outcomes.append(outcome)
            print(f"[{i}/{len(selected)}] {case.kind}: {case.name}: {outcome.verdict}",
                  file=sys.stderr, flush=True)
    finally:
        undo_read_only(w)
        if args.keep is None:
            shutil.rmtree(w, ignore_errors=True)
    print("| # | kind | case | exit | verdict | first line of stderr |")
    print("|---|---|---|---|---|---|")
    for i, o in enumerate(outcomes, 1):
        msg = o.message.replace(str(w) + "/", "").replace("|", "\\|")
        msg = msg if len(msg) <= 140 else msg[:137] + "..."
        verdict = o.verdict.replace("|", "\\|")
        print(f"| {i} | {o.case.kind} | {o.case.name} | {o.status} | {verdict} | {msg} |")
    unclear = sum(o.verdict.startswith(("unclear", "slow", "refused a valid")) for o in outcomes)
    print(f"\n{len(outcomes)} cases in {time.monotonic() - t0:.0f} s; unclear or refused-valid: "
          f"{unclear}")
    print(f"hostile-trial: cases={len(outcomes)} "
          f"tracebacks={sum(o.traceback for o in outcomes)} "
          f"silent_wrong={sum(o.silent_wrong for o in outcomes)} "
          f"lost_files={sum(len(o.lost) for o in outcomes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
