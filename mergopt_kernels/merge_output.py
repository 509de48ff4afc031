"""The output folder of a merge: checked before anything is read, written under a temporary name.

A merge writes into ``.<out>.partial-<pid>-<random>`` beside ``out`` and renames it to ``out``
only when everything is written. That temporary folder is removed when the merge fails, and on
SIGTERM or SIGHUP (the process then exits with status 128 + the signal's number, as a shell
reports it). A SIGKILL, or a power cut, leaves it behind: the next merge to the same ``out``
removes the partial folders whose process no longer runs, with a warning naming each, and
names (without touching) those whose process still runs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import threading
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

HANDLED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
SPACE_MARGIN = 1 << 20  # bytes of headers, index and copied files beyond the tensor data, at least


def check_out(out: Path) -> None:
    """Refuse an ``out`` that is a symlink, exists as a file or a non-empty folder, or lacks its parent."""
    if out.is_symlink():
        raise FileExistsError(f"out: {out} is a symlink (to {os.readlink(out)}); give the path of a new folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"out: {out} exists and is not an empty folder; choose a new output folder")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"out: the parent folder {out.parent} does not exist")


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return True


def clear_stale_partials(out: Path) -> list[Path]:
    """Remove the partial folders of killed merges to ``out``; returns those removed.

    Each removal is reported by a warning; a partial folder whose process still runs (another
    merge to the same ``out``) is named in a warning and left alone.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.partial-(\d+)-[0-9a-f]{{8}}")
    removed = []
    for path in sorted(out.parent.iterdir()):
        match = pattern.fullmatch(path.name)
        if match is None or not path.is_dir() or path.is_symlink():
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and _process_runs(pid):
            warnings.warn(f"{path} is the partial output of process {pid}, which still runs (another merge to "
                          f"{out}?); left as is", stacklevel=3)
            continue
        shutil.rmtree(path)
        removed.append(path)
        warnings.warn(f"removed {path}, the partial output of an interrupted merge (process {pid})", stacklevel=3)
    return removed


def check_free_space(out: Path, nbytes: int) -> None:
    """Refuse a merge whose ``nbytes`` of tensor data (plus a margin) do not fit where ``out`` goes."""
    free = shutil.disk_usage(out.parent).free
    needed = nbytes + SPACE_MARGIN
    if free < needed:
        raise OSError(errno.ENOSPC, f"out: {out.parent} has {free:,} bytes free; the merged model needs "
                                    f"{needed:,} (tensor data {nbytes:,} plus headers and copied files)")


class _Terminated(BaseException):
    """SIGTERM or SIGHUP arrived while the output was written."""


@contextlib.contextmanager
def partial_folder(out: Path) -> Iterator[Path]:
    """A new temporary folder beside ``out``; renamed to ``out`` when the block succeeds.

    On an exception, SIGTERM or SIGHUP (handled in the main thread only: Python runs signal
    handlers there) the folder is removed; a signal then ends the process with 128 + its number.
    """
    handle = threading.current_thread() is threading.main_thread()
    received = []  # the signal that arrived, if one did

    def terminate(signum, frame):
        received.append(signum)
        raise _Terminated(signum)

    previous = {signum: signal.signal(signum, terminate) for signum in HANDLED_SIGNALS} if handle else {}
    partial = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        partial.mkdir()
        try:
            yield partial
            if out.exists():
                out.rmdir()
            os.replace(partial, out)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    except BaseException:
        if received:  # whatever the exception became: C code it crossed (torch, safetensors) may replace it
            raise SystemExit(128 + received[0]) from None
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
