"""What every ``lsmfm`` subcommand shares: argument parsing of z,y,x sizes, output checks
and allocation, reading the input, the one-line error and the JSON summary.

Imports only the standard library, numpy and torch-free parts of the package, so that
``lsmfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import signal
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from napari_lsmfm.engine.grid import as_triple
from napari_lsmfm.io.output import IN_MEMORY_BYTES, Outputs, check_output_path, check_outputs

__all__ = [
    "EXIT_USER_ERROR",
    "Outputs",
    "check_output_path",
    "check_outputs",
    "in_memory",
    "one_line",
    "parse_triple",
    "print_summary",
    "run_subcommand",
    "terminate_as_interrupt",
    "user_errors",
]

EXIT_USER_ERROR = 2  # the exit status of an expected failure (bad file, existing output)


def parse_triple(text: str | None, name: str, kind: type = float, *,
                 allow_one: bool = False) -> tuple | None:
    """The three positive numbers z,y,x (``kind`` int or float) of option ``--name``'s
    ``text`` ("2,1,1" or "2x1x1"; with ``allow_one`` also "2" for 2,2,2). None stays None."""
    if text is None:
        return None
    try:
        values: Any = [kind(v) for v in text.replace("x", ",").split(",")]
    except ValueError:
        raise ValueError(f"--{name} must be three numbers z,y,x, got {text!r}") from None
    if allow_one and len(values) == 1:
        values = values[0]
    try:
        return as_triple(values, f"--{name}", kind=kind, positive=True)
    except ValueError:
        raise ValueError(
            f"--{name} must be three positive numbers z,y,x, got {text!r}"
        ) from None


def in_memory(image: Any) -> Any:
    """``image`` as a numpy array when it holds at most :data:`IN_MEMORY_BYTES` (one read
    is faster than window-by-window reads), else unchanged (a lazy dask / zarr array)."""
    nbytes = int(np.prod(image.shape)) * np.dtype(image.dtype).itemsize
    return np.asarray(image) if nbytes <= IN_MEMORY_BYTES else image


def one_line(exc: BaseException) -> str:
    """The error message of ``exc`` on one line (with the file name of a file error)."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return " ".join(text.split())


def print_summary(summary: dict[str, Any]) -> None:
    """Print the run's summary as one JSON line on stdout (the last line a script reads)."""
    print(json.dumps(summary))


def user_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Decorate a subcommand's ``run(args)``: a device out-of-memory error becomes a
    ValueError, which ``lsmfm`` prints as one line (its message says what to change);
    a SIGTERM (``kill``) stops the run like Ctrl-C, so its outputs under construction are
    removed and the user's files stay as they were."""

    @functools.wraps(run)
    def wrapper(args: argparse.Namespace) -> int:
        from napari_lsmfm.engine.device import DeviceMemoryError

        try:
            with terminate_as_interrupt():
                return run(args)
        except DeviceMemoryError as exc:
            raise ValueError(str(exc)) from None

    return wrapper


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block, SIGTERM raises KeyboardInterrupt (in the main thread only;
    elsewhere, and where signals cannot be set, nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_subcommand(add_parser: Callable[[Any], argparse.ArgumentParser],
                   argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (the subcommand's name first) with the one subcommand ``add_parser``
    adds, and run it; errors are raised, not printed (for tests and scripts)."""
    parser = argparse.ArgumentParser(prog="lsmfm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)
