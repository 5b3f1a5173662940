"""The one output allocator: where a task's result is written while it is computed.

- :func:`check_outputs` / :func:`check_output_path`: before any work starts, every
  command-line output is checked: its suffix, not there unless ``overwrite`` (and not a
  partial output of an interrupted run), its folder there and writable, and none of
  them is, holds or lies inside an input (the image, brushes, a model, weights, a PSF),
  also through links or an enclosing Zarr group, whatever ``overwrite`` says;
- :class:`Outputs`: the named outputs of one run. A ``.zarr`` target is allocated on disk
  under a hidden temporary name beside it, marked partial, and filled block by block
  (memory bounded by the block, not the volume); a TIFF target is a numpy array written
  at :meth:`Outputs.finish`. ``finish`` clears the marks and moves every output into
  place; an error, Ctrl-C or ``kill -9`` before that leaves the user's names as they
  were (an old result replaced with ``--overwrite`` included);
- the partial mark (:func:`mark_partial`, :func:`partial_attrs`, :func:`clear_partial`,
  :func:`partial_info`, :func:`partial_message`): ``{"napari_lsmfm": {"partial": true,
  ...}}`` in a Zarr store's root attributes, written before its first block and removed
  after its last. :func:`~napari_lsmfm.io.open_volume`, the napari reader and a rerun
  refuse a marked store. A resumable run can build under the final name, marked, keep
  its progress in the mark and continue where it says it stopped;
- :func:`scratch_output`: an unnamed output (widgets, scripts): numpy up to
  ``max_bytes``, above it an empty Zarr array in a temporary folder removed when Python
  exits (or by :func:`remove_scratch`).
"""

from __future__ import annotations

import atexit
import errno
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from napari_lsmfm.engine.store import ANOTHER_RUN, StagedOutput, is_temporary, user_named

__all__ = [
    "IN_MEMORY_BYTES",
    "PARTIAL_KEY",
    "VOLUME_SUFFIXES",
    "ZARR_CHUNKS",
    "Outputs",
    "check_output_path",
    "check_not_inputs",
    "check_outputs",
    "check_writable",
    "clear_partial",
    "mark_partial",
    "partial_attrs",
    "partial_info",
    "partial_message",
    "read_zarr_attrs",
    "remove_scratch",
    "scratch_output",
    "write_zarr_attrs",
]

IN_MEMORY_BYTES = 2 * 2**30  # inputs up to this are read into memory; results up to it stay numpy
VOLUME_SUFFIXES = (".tif", ".tiff", ".zarr")
ZARR_CHUNKS = (64, 256, 256)
PARTIAL_KEY = "napari_lsmfm"  # root attribute of a Zarr store: {"partial": true, ...}
_ZARR_META = (".zgroup", ".zarray", "zarr.json")


# ------------------------------------------------------------------ checks before work


def check_not_inputs(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, str | os.PathLike | None],
) -> dict[str, Path]:
    """Raise ValueError when an output is, holds or lies inside an input (links and hard
    links followed, an input inside a Zarr group stands for the whole group), or two
    outputs overlap, whatever ``--overwrite`` says. ``outputs`` and ``inputs`` map the
    option names the user typed (``"--out"``, ``"the image"``) to their paths (None: not
    given). Returns the given outputs as Paths."""
    given = {k: Path(v).expanduser() for k, v in outputs.items() if v is not None}
    sources = {k: Path(v).expanduser() for k, v in inputs.items() if v is not None}
    for name, out in given.items():
        for what, source in sources.items():
            relation = _overlap(out, source, zarr_group=True)
            if relation:
                raise ValueError(
                    f"{name} {out} {relation} {what} {source}: writing there would destroy "
                    "an input, with or without --overwrite; choose another output name"
                )
    names = list(given)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            if _overlap(given[second], given[first], zarr_group=False):
                raise ValueError(
                    f"{first} and {second} name the same place ({given[first]}, "
                    f"{given[second]}); give each output its own name"
                )
    return given


def check_outputs(
    outputs: Mapping[str, str | os.PathLike | None],
    inputs: Mapping[str, str | os.PathLike | None],
    *,
    overwrite: bool,
    folders: Collection[str] = (),
    resume: bool = False,
) -> dict[str, Path | None]:
    """Check every output of a run before any work: :func:`check_not_inputs`, then each
    output as :func:`check_output_path` (names in ``folders`` are folders, not volumes).
    Returns the outputs as Paths (None stays None)."""
    check_not_inputs(outputs, inputs)
    return {k: check_output_path(v, overwrite, folder=k in folders, resume=resume)
            for k, v in outputs.items()}


def check_writable(folder: str | os.PathLike, shown: str | os.PathLike | None = None) -> None:
    """PermissionError naming ``shown`` (the user's output path; default ``folder``) unless
    a file can be made in ``folder`` (tried with a hidden file, removed at once)."""
    folder = Path(folder)
    shown = Path(shown) if shown is not None else folder
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{shown.name}.probe-", dir=folder)
    except OSError as err:
        raise PermissionError(
            err.errno or errno.EACCES,
            f"cannot write here ({err.strerror or err}); choose a folder you can write to",
            str(shown),
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_path(path: str | os.PathLike | None, overwrite: bool, *,
                      folder: bool = False, resume: bool = False) -> Path | None:
    """The output ``path`` as a Path, or an error saying what to do: it must end in .tif,
    .tiff or .zarr (unless ``folder``), not exist unless ``overwrite`` (a partial output
    of an interrupted run says so: rerun with --overwrite, or --resume where the command
    has it, ``resume``), and its folder must exist and be writable (tried with a hidden
    file, removed at once). None stays None."""
    if path is None:
        return None
    target = Path(path).expanduser()
    if not folder and not target.name.lower().endswith(VOLUME_SUFFIXES):
        raise ValueError(f"{target.name}: outputs end in .tif, .tiff or .zarr (e.g. out.tif)")
    if (target.exists() or target.is_symlink()) and not overwrite:
        if partial_info(target) is not None:
            raise ValueError(partial_message(target, resume=resume))
        raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if target.is_dir() and not target.is_symlink():
        # --overwrite replaces a Zarr store or a saved model, never another folder
        mine = (target / "config.json").is_file() if folder else _is_zarr(target)
        if not mine:
            what = "a saved model" if folder else "a Zarr store"
            raise FileExistsError(
                errno.EEXIST, f"this folder is not {what}, so --overwrite will not replace "
                "it; choose another name", str(target))
    parent = target.parent
    if not parent.is_dir():
        raise FileNotFoundError(2, "the output folder does not exist", str(parent))
    check_writable(parent, target)
    return target


def _overlap(out: Path, source: Path, *, zarr_group: bool) -> str | None:
    """How ``out`` meets ``source``: "is", "lies inside", "holds", "lies in the Zarr
    group of" (with ``zarr_group``: the outermost group holding ``source``), or None."""
    o, s = _real(out), _real(source)
    root = _zarr_root(s) if zarr_group else s
    if o == s or _same_file(out, source):
        return "is"
    if s in o.parents:
        return "lies inside"
    if o in s.parents:
        return "holds"
    if root in o.parents:
        return "lies in the Zarr group of"
    return None


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return path.absolute()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links too
    except OSError:
        return False


def _is_zarr(path: Path) -> bool:
    return any((path / m).is_file() for m in _ZARR_META)


def _zarr_root(path: Path) -> Path:
    """The outermost Zarr group holding ``path`` (``path`` itself when none does)."""
    root = path
    for parent in path.parents:
        if not _is_zarr(parent):
            break
        root = parent
    return root


# ---------------------------------------------------------------------- allocation


class Outputs:
    """The named outputs of one run: Zarr arrays built under hidden names and filled in
    place, or numpy arrays written at the end; every one appears under its name at
    :meth:`finish`, all complete. Use as a ``with`` block: leaving it by an exception
    (Ctrl-C included) removes what was built. ``written`` lists the paths made.

    ``resume=True`` (a resumable command's ``--resume``): a ``.zarr`` output is built
    under its final name instead, marked partial (``resumable: true``) until
    :meth:`finish`; one an interrupted run left (still marked) is opened again as it is,
    so the run can skip the blocks :meth:`note` recorded in its mark. An error or a kill
    leaves it marked, for the next ``--resume``."""

    def __init__(self, voxel_size: Any, overwrite: bool, *, command: str = "lsmfm",
                 resume: bool = False) -> None:
        self.voxel_size = voxel_size
        self.overwrite = overwrite
        self.command = command
        self.resume = resume
        self.pending: list[tuple[Path, Any, str]] = []
        self.staged: list[StagedOutput] = []
        self.resumed: list[Path] = []
        self.written: list[str] = []

    def __enter__(self) -> Outputs:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        staged = list(self.staged)
        self.abort()
        for one in staged:  # a file error names the user's path, not the temporary
            renamed = user_named(exc, one.tmp, one.target)
            if renamed is not exc:
                raise renamed from None

    def array(self, path: Path | None, shape: tuple[int, ...], dtype: Any, kind: str) -> Any:
        """An array of ``shape`` and ``dtype`` to fill for ``path`` (None: no output): a
        Zarr array under a hidden name beside a ``.zarr`` path, marked partial; a numpy
        array for a TIFF path."""
        if path is None:
            return None
        if path.name.lower().endswith(".zarr"):
            from napari_lsmfm.io.write import create_zarr, volume_stem

            if self.resume:
                return self._resumable(path, shape, dtype, kind)
            staged = StagedOutput(path, replace=self.overwrite)
            self.staged.append(staged)
            return create_zarr(
                staged.tmp, shape, dtype, voxel_size=self.voxel_size, kind=kind,
                chunks=ZARR_CHUNKS, name=volume_stem(path),
                attrs=partial_attrs(command=self.command, target=str(path)),
            )
        array = np.zeros(shape, dtype)
        self.pending.append((path, array, kind))
        return array

    def finish(self) -> None:
        """Write the numpy outputs to their files, clear the Zarr outputs' partial marks
        and move them into place (an old result is removed only now)."""
        from napari_lsmfm.io.write import write_volume

        for path, array, kind in self.pending:
            if not self.overwrite and (path.exists() or path.is_symlink()):
                raise FileExistsError(errno.EEXIST, ANOTHER_RUN, str(path))
            write_volume(path, array, voxel_size=self.voxel_size, kind=kind,
                         overwrite=self.overwrite)
            self.written.append(str(path))
        self.pending = []
        while self.staged:
            staged = self.staged[0]
            try:
                clear_partial(staged.tmp)
                staged.commit()
            except OSError as err:
                raise user_named(err, staged.tmp, staged.target) from None
            self.staged.pop(0)
            self.written.append(str(staged.target))
        for path in self.resumed:
            clear_partial(path)
            self.written.append(str(path))
        self.resumed = []

    def note(self, path: Path, **info: Any) -> None:
        """Record progress (JSON-ready ``info``, e.g. the blocks done) in the partial mark
        of the output for ``path``, where a resumed run reads it (:func:`partial_info`)."""
        for staged in self.staged:
            if staged.target == path:
                mark_partial(staged.tmp, **info)
                return
        mark_partial(path, **info)

    def _resumable(self, path: Path, shape: tuple[int, ...], dtype: Any, kind: str) -> Any:
        import zarr

        from napari_lsmfm.io.write import create_zarr, volume_stem

        self.resumed.append(path)
        if partial_info(path) is None:
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, "a complete output, nothing to resume "
                                      "(choose another name, or pass --overwrite)", str(path))
            return create_zarr(
                path, shape, dtype, voxel_size=self.voxel_size, kind=kind, chunks=ZARR_CHUNKS,
                name=volume_stem(path),
                attrs=partial_attrs(command=self.command, target=str(path), resumable=True),
            )
        array = zarr.open_array(str(path / "0"), mode="r+")
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
            raise ValueError(
                f"{path} cannot be resumed: it holds {tuple(array.shape)} {array.dtype}, this "
                f"run writes {tuple(shape)} {np.dtype(dtype)}; rerun with --overwrite"
            )
        return array

    def abort(self) -> None:
        """Remove every output not yet in place (the names stay as they were)."""
        for staged in self.staged:
            staged.abort()
        self.staged = []
        self.pending = []


# ------------------------------------------------------------------ the partial mark


def mark_partial(folder: str | os.PathLike, **info: Any) -> None:
    """Mark the Zarr group (or array) ``folder`` as a partial output: its root
    attributes get ``{"napari_lsmfm": {"partial": true, "pid", "host", "started",
    **info}}`` (JSON-ready ``info``, e.g. ``resumable=True`` or the blocks done), written
    before its data. Called again, it updates ``info``."""
    folder = Path(folder)
    attrs = read_zarr_attrs(folder)
    mark = dict(attrs.get(PARTIAL_KEY) or {})
    if not mark.get("partial"):
        mark.update(partial=True, pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    mark.update(info)
    attrs[PARTIAL_KEY] = mark
    write_zarr_attrs(folder, attrs)


def partial_attrs(**info: Any) -> dict:
    """The attribute :func:`mark_partial` writes, to put into a new group's attributes."""
    return {PARTIAL_KEY: {"partial": True, "pid": os.getpid(), "host": socket.gethostname(),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}}


def clear_partial(folder: str | os.PathLike) -> None:
    """Remove the partial mark of ``folder`` (the last write of a complete output)."""
    folder = Path(folder)
    attrs = read_zarr_attrs(folder)
    if PARTIAL_KEY in attrs:
        del attrs[PARTIAL_KEY]
        write_zarr_attrs(folder, attrs)


def partial_info(path: str | os.PathLike) -> dict | None:
    """The partial mark of the Zarr store at ``path`` or of a Zarr group that holds it
    (a dict with at least ``partial: True``), else None. A hidden temporary of an
    output being built (or left by a killed run) counts as partial, marked or not."""
    path = Path(path)
    for folder in (path, *list(path.parents)[:8]):
        if _attrs_file(folder) is None:
            if folder != path:
                break
            continue
        mark = read_zarr_attrs(folder).get(PARTIAL_KEY)
        if isinstance(mark, dict) and mark.get("partial"):
            return mark
    return {"partial": True, "temporary": True} if is_temporary(path) else None


def partial_message(path: str | os.PathLike, *, resume: bool = False) -> str:
    """The one line for an output an interrupted run left: rerun with --resume (where
    the command has it) or --overwrite."""
    how = "--resume or --overwrite" if resume else "--overwrite"
    return f"{path} is a partial output of an interrupted run: rerun with {how}"


def read_zarr_attrs(folder: str | os.PathLike) -> dict:
    """The attributes of the Zarr group or array ``folder`` (format 2 ``.zattrs`` or
    format 3 ``zarr.json``), read as JSON without opening the store; {} when none."""
    found = _attrs_file(Path(folder))
    if found is None:
        return {}
    file, v3 = found
    try:
        body = json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, ValueError):
        return {}
    attrs = body.get("attributes", {}) if v3 else body
    return dict(attrs) if isinstance(attrs, dict) else {}


def write_zarr_attrs(folder: str | os.PathLike, attrs: Mapping[str, Any]) -> None:
    """Replace the attributes of the Zarr group or array ``folder`` (in one rename)."""
    found = _attrs_file(Path(folder))
    if found is None:
        raise ValueError(f"{folder} is not a Zarr group or array")
    file, v3 = found
    if v3:
        body = json.loads(file.read_text(encoding="utf-8"))
        body["attributes"] = dict(attrs)
    else:
        body = dict(attrs)
    tmp = file.with_name(f"{file.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(body, indent=2), encoding="utf-8")
    os.replace(tmp, file)


def _attrs_file(folder: Path) -> tuple[Path, bool] | None:
    if (folder / "zarr.json").is_file():
        return folder / "zarr.json", True
    if (folder / ".zgroup").is_file() or (folder / ".zarray").is_file():
        return folder / ".zattrs", False
    return None


# --------------------------------------------------------------------------- scratch


def scratch_output(shape: tuple[int, ...], dtype: Any, *, max_bytes: int = 2**30,
                   prefix: str = "lsmfm-", chunks: tuple[int, ...] = (32, 256, 256)
                   ) -> tuple[Any, str | None]:
    """``(None, None)`` when a result of ``shape`` and ``dtype`` fits in ``max_bytes`` (the
    task allocates numpy), else ``(empty zarr array, its temporary folder)``; the folder
    is removed when Python exits."""
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize <= max_bytes:
        return None, None
    import zarr

    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    chunks = tuple(min(s, c) for s, c in zip(shape, chunks, strict=False))
    out = zarr.open(str(Path(folder) / "result.zarr"), mode="w", shape=shape, dtype=dtype,
                    chunks=chunks)
    return out, folder


def remove_scratch(folder: str | None) -> None:
    """Remove a folder made by :func:`scratch_output` (when its layer is gone)."""
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
