"""File helpers: content hashes, output folders that appear whole or not at all, and cleaning up
after a run that was killed.

Temporary folders are named `.NAME.partial-PID-RANDOM` (an export in progress) and
`.NAME.old-PID-RANDOM` (the export it replaces, for the instant between two renames). The PID says
whether the run that made one is still alive: a later run removes only those of dead processes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterator

from gemma_edge.errors import OutputFolderError, Terminated

# What the disk or the file system says when an output cannot be written, in the user's words.
WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_dead_leftovers(parent: Path, prefix: str, on_removed: Callable[[Path], None] = lambda p: None) -> list[Path]:
    """Remove the folders `{prefix}PID-*` in parent whose process PID is gone (a run killed with
    SIGKILL, or by the out-of-memory killer, cannot clean up after itself). Names without a PID
    (not ours, or older versions') and live processes' folders are left alone."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-[^/]+$")
    removed = []
    for path in sorted(parent.glob(f"{glob_escape(prefix)}*")) if parent.is_dir() else []:
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            on_removed(path)
    return removed


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new private folder `{prefix}PID-RANDOM` in parent (see remove_dead_leftovers)."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=parent))


# SIGINT and SIGTERM as the command line's handlers received them (cli.main clears it per command).
# Each also raised its exception, but Python loses one raised inside a finalizer or a weakref callback
# (it prints "Exception ignored in ..." and goes on): a folder is committed only while this is empty.
signals_received: list[int] = []


def stop_if_signalled() -> None:
    """Raise the exception of a signal received earlier whose own was lost on the way."""
    if signals_received:
        raise Terminated() if signals_received[0] == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block is done (a pair of renames must not be cut in two);
    a signal that came meanwhile is delivered after it. By Python handlers, not a signal mask: the
    kernel hands a process's signal to any thread that does not mask it (torch's, ONNX Runtime's)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread has handlers
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)  # Python's own for SIGINT raises KeyboardInterrupt; the CLI's for SIGTERM
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])


def check_output_folder(target: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that exists unless it is an earlier export that
    --overwrite may replace: never delete what the user did not ask us to delete."""
    from gemma_edge.manifest import export_contents_problem

    target = Path(target).absolute()  # "-o ." names the folder by its real name, not ""
    if target.parent.is_dir():
        _recover_dead_runs(target)  # first: a killed run's export may be put back where it was
    if not (target.exists() or target.is_symlink()):
        return
    if not overwrite:
        raise OutputFolderError(f"{target} already exists; choose another -o folder, or pass --overwrite "
                                "to replace an earlier export")
    problem = export_contents_problem(target)
    if problem:
        raise OutputFolderError(f"--overwrite replaces only a folder that 'gemma-edge export' wrote, and {target} "
                                f"is not one: {problem}. Choose another -o folder (nothing was changed)")


@contextlib.contextmanager
def staged_folder(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it becomes `target` in one rename.

    An interrupted or failed export leaves no half-written target and no temporary folder (a signal
    whose exception was lost on the way stops it before the rename: signals_received); an
    existing target is replaced only if it is an earlier export (check_output_folder), with
    overwrite=True, once the new one is complete. Leftovers of a killed run are removed first.
    """
    target = Path(target).absolute()
    parent = target.parent
    tmp = None
    try:
        with _writing(parent):
            check_output_folder(target, overwrite)
            parent.mkdir(parents=True, exist_ok=True)
            with signals_deferred():  # a Ctrl-C between making the folder and holding its name would leave it
                tmp = make_temp_dir(parent, f".{target.name}.partial-")
            yield tmp
            tmp.chmod(0o755)
            with signals_deferred():
                stop_if_signalled()
                _replace(tmp, target)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _replace(tmp: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = make_temp_dir(target.parent, f".{target.name}.old-")
        old.rmdir()
        target.rename(old)
    tmp.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _recover_dead_runs(target: Path) -> None:
    """A killed run's partial folder goes; its `.old` one (a run killed between its two renames)
    is put back where the user left it if nothing took its place, else removed."""
    remove_dead_leftovers(target.parent, f".{target.name}.partial-")
    pattern = re.compile(re.escape(f".{target.name}.old-") + r"(\d+)-")
    for old in sorted(target.parent.glob(f"{glob_escape(f'.{target.name}.old-')}*")):
        match = pattern.match(old.name)
        if match and old.is_dir() and not process_alive(int(match.group(1))):
            if target.exists() or target.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.rename(target)


@contextlib.contextmanager
def _writing(folder: Path) -> Iterator[None]:
    """An OSError of the disk (full, read-only, not ours) as one clear error naming the folder."""
    try:
        yield
    except OSError as e:
        named = Path(e.filename).absolute() if isinstance(e.filename, (str, os.PathLike)) else None
        ours = named is None or named == folder.absolute() or folder.absolute() in named.parents
        code = _disk_errno(e, folder)
        if code not in WRITE_ERRORS or not ours:
            raise  # not the output's (an unreadable checkpoint says so itself)
        raise OutputFolderError(f"cannot write the export in {folder}: {WRITE_ERRORS[code]} "
                                f"({e.filename or e.strerror or e}); free some space or choose another -o folder. "
                                "Nothing was left behind, and an earlier export there is unchanged") from None


def _disk_errno(e: OSError, folder: Path) -> int | None:
    """e's errno; where a writer lost it and the folder's disk has less than 1 MiB left, ENOSPC.
    numpy's tofile, with which onnx_ir writes an ONNX export's weights, says only "problem writing
    element N to file" when the disk fills up."""
    if e.errno is None:
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 1 << 20:
                return errno.ENOSPC
    return e.errno


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """One process at a time in the block, across processes (an advisory lock on the file `lock`,
    made if missing and left in place): a second process waits here until the first is done, then
    finds its work made. The kernel drops the lock of a killed process."""
    lock = Path(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: Path, data: bytes | str) -> None:
    """data at path, through a temporary file beside it and a rename: readers see the old file or
    the new one, never half of one, and a failure leaves no temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
