"""Temporary files in bertcli's cache that prove whose they are.

A run that packs sequences or spools a stream writes a temporary file into the cache and removes
it when done; one killed by SIGKILL (or a power cut) cannot, and its file would stay for ever.
So each such file is locked (`fcntl.flock`) by its writer for as long as it is open: the kernel
drops the lock when the writer dies, however it dies. `sweep` removes a cache directory's
temporary files that are bertcli's by name, old, and locked by nobody: their writer is gone.
The name carries this machine's host name, and only this host's files are swept: where locks are
local to each host (an NFS home mounted with `nolock`), another host's lock cannot be seen.
Files of bertcli versions from before the lock (named `tmpXXXXXXXX`) are never touched.

A private directory (`locked_temp_dir`: export's int8 step, which ONNX Runtime does on files) is
locked through its own descriptor the same way; `sweep_dirs` removes one only when, besides that,
it holds nothing but regular files under the names its writer makes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ABANDONED_AFTER = 600.0  # seconds without a write before an unlocked temporary file counts as abandoned


def _prefix() -> str:
    return "bertcli-" + re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] + "-"


def locked_temp(directory: Path, suffix: str) -> tuple[int, Path]:
    """A new file in `directory`, open for writing and locked until its descriptor (and every copy
    of it a fork made) is closed."""
    fd, name = tempfile.mkstemp(prefix=_prefix(), suffix=suffix, dir=directory)
    _lock_new(fd, lambda: os.unlink(name))
    return fd, Path(name)


def _lock_new(fd: int, remove: Callable[[], None]) -> None:
    """Lock the descriptor of an entry just made (its own: nobody else can hold it). On a file system without
    flock it stays unlocked, and the sweeps there can prove nothing; on another error it is closed and removed."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            remove()
            raise


def sweep(directory: Path, suffix: str, older_than: float = ABANDONED_AFTER) -> list[tuple[Path, int]]:
    """Remove the files of `directory` that `locked_temp` names with `suffix`, that are regular files
    (not links), unchanged for `older_than` seconds and locked by no process; the removed paths and sizes.
    Anything it cannot prove abandoned, or cannot check, is left alone."""
    removed: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now, name = time.time(), re.compile(re.escape(_prefix()) + r"[a-z0-9_]{8}" + re.escape(suffix))  # mkstemp's
    for entry in entries:
        try:
            if not name.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                continue  # not one of ours, or not a plain file (never opened: a FIFO or device could block)
        except OSError:
            continue
        path = Path(entry.path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)  # for writing: NFS locks need it
        except OSError:
            continue  # replaced by a link meanwhile, gone, or not ours to read
        try:
            info = os.fstat(fd)
            if (not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.getuid()
                    or now - info.st_mtime < older_than):
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live writer holds it, or no flock here
            current = os.lstat(path)
            if (current.st_dev, current.st_ino) == (info.st_dev, info.st_ino):  # still the file that was checked
                path.unlink()
                removed.append((path, info.st_size))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def swept(directory: Path, suffix: str) -> None:
    """`sweep`, saying on stderr what it removed."""
    _say(sweep(directory, suffix), "file(s)", directory, "runs")


def _say(removed: list[tuple[Path, int]], what: str, directory: Path, by: str) -> None:
    if removed:
        sys.stderr.write(f"removed {len(removed)} temporary {what}, {sum(size for _, size in removed) / 1e6:,.0f} MB, "
                         f"left in {directory} by {by} that were killed\n")


def locked_temp_dir(directory: Path, label: str) -> tuple[int, Path]:
    """A new private directory (mode 0700) in `directory`, locked until the returned descriptor is closed."""
    name = tempfile.mkdtemp(prefix=_prefix() + label + ".", dir=directory)
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    _lock_new(fd, lambda: os.rmdir(name))
    return fd, Path(name)


def sweep_dirs(directory: Path, label: str, names: set[str], older_than: float = ABANDONED_AFTER
               ) -> list[tuple[Path, int]]:
    """Remove the directories of `directory` that `locked_temp_dir` names with `label`, that are real directories
    of this user, locked by no process, holding only regular files named in `names`, none changed for `older_than`
    seconds; the removed paths and the bytes they held. Anything it cannot prove abandoned is left alone."""
    removed: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now, name = time.time(), re.compile(re.escape(_prefix() + label + ".") + r"[a-z0-9_]{8}")  # mkdtemp's
    for entry in entries:
        if not name.fullmatch(entry.name):
            continue
        path = Path(entry.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # a link, not a directory, gone, or not ours to read
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or now - info.st_mtime < older_than:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # OSError: a live writer holds it, or no flock here
            children = [(child, os.stat(child, dir_fd=fd, follow_symlinks=False)) for child in os.listdir(fd)]
            if not all(child in names and stat.S_ISREG(st.st_mode) and st.st_nlink == 1  # (a second name: yours?)
                       and now - st.st_mtime >= older_than for child, st in children):
                continue
            current = os.lstat(path)
            if (current.st_dev, current.st_ino) != (info.st_dev, info.st_ino):
                continue  # replaced meanwhile: not the directory that was checked
            for child, _ in children:
                os.unlink(child, dir_fd=fd)
            os.rmdir(path)
            removed.append((path, sum(st.st_size for _, st in children)))
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def swept_dirs(directory: Path, label: str, names: set[str], by: str) -> None:
    """`sweep_dirs`, saying on stderr what it removed."""
    _say(sweep_dirs(directory, label, names), "folder(s)", directory, by)
