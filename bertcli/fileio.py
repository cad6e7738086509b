"""Writes that never leave a torn file, and that say clearly when the disk refuses them.

`atomic_write` writes to a temporary name in the same directory, fsyncs, then renames: a crash
leaves either the old file or the new one. `publish` moves a whole staged directory of files
into place by renames alone (which need no space), so a full disk met while writing a
checkpoint leaves the previous checkpoint exactly as it was.

In a directory this process holds (rundir.claim), every temporary name is noted in the directory's
lock file before it is made and struck off once it is gone (`Notes`): the next writer removes a killed
one's leftovers by that note alone, never by a name, which could be a file of the user's.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable

from bertcli.errors import BertcliError

# failures of the machine's storage rather than of bertcli: a clear message and exit code 2
STORAGE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG, errno.EIO}


class OutputError(BertcliError):
    """A file could not be written (full disk, read-only or forbidden directory, file size limit)."""

    def __init__(self, path: str | Path, reason: str):
        self.reason = reason
        super().__init__(f"{path}: cannot write: {reason}")


def storage_error(path: str | Path, err: OSError, elsewhere: bool = True) -> OutputError:
    """`elsewhere`: the command has an --out to write elsewhere with (export writes into the checkpoint)."""
    reason = err.strerror or str(err)
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        reason += " (free some space" + (", or write elsewhere with --out)" if elsewhere else ")")
    return OutputError(path, reason)


def _file_mode() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return 0o666 & ~mask


FILE_MODE = _file_mode()


class Notes:
    """The lock file of a directory this process holds: its pid on the first line, then the temporary entries
    being written there (an atomic write's file, a checkpoint's side directory). Written before an entry is
    made, so that a process killed while writing it leaves the proof that bertcli made it."""

    def __init__(self, fd: int, carried: list[str]):
        self._fd: int | None = fd
        self.names = list(carried)
        self._length = 0
        self._save()

    def _save(self, sync: bool = False) -> None:
        if self._fd is None:
            return
        text = (f"{os.getpid()}\n" + "".join(f"{name}\n" for name in self.names)).encode()
        try:  # (padded with blank lines to the old length first: a kill before the truncation leaves no old name)
            os.pwrite(self._fd, text + b"\n" * max(0, self._length - len(text)), 0)
            os.ftruncate(self._fd, len(text))
            self._length = len(text)
            if sync:
                os.fsync(self._fd)  # the note reaches the disk before the entry it names is made
        except OSError:
            pass  # a full disk: what is not noted is never removed (only the next writer's clean-up is lost)

    def add(self, name: str) -> None:
        if name not in self.names:
            self.names.append(name)
            self._save(sync=True)

    def forget_gone(self, directory: Path) -> None:
        """Strike off the names of entries that are no longer there (the last holder's, removed or published)."""
        kept = [name for name in self.names if os.path.lexists(directory / name)]
        if kept != self.names:
            self.names = kept
            self._save()

    def close(self) -> None:
        """Write no more (the descriptor is about to be closed)."""
        self._fd = None

    def done(self, name: str) -> None:
        if name in self.names:
            self.names.remove(name)
            self._save()


_HELD: dict[tuple[int, int], Notes] = {}  # the directories this process holds, by (device, inode)


def _key(directory: Path) -> tuple[int, int] | None:
    try:
        info = os.stat(directory)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def hold_notes(directory: Path, notes: Notes) -> tuple[int, int] | None:
    """Note this process's temporary entries in `directory` with `notes`; returns the key to `release_notes` with."""
    key = _key(directory)
    if key is not None:
        _HELD[key] = notes
    return key


def release_notes(key: tuple[int, int] | None, notes: Notes) -> None:
    """`notes` are written no more (its directory may have moved since: it is found by the key it was held by)."""
    notes.close()
    if key is not None and _HELD.get(key) is notes:
        del _HELD[key]


def note(path: Path) -> None:
    """`path` is about to be made by bertcli, and may be left behind (a directory this process holds alone)."""
    notes = _HELD.get(_key(path.parent))
    if notes is not None:
        notes.add(path.name)


def unnote(path: Path) -> None:
    """`path` is gone, or is no longer temporary."""
    notes = _HELD.get(_key(path.parent))
    if notes is not None:
        notes.done(path.name)


def finite_number(value) -> bool:
    """A JSON number that is finite (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def all_finite(value) -> bool:
    """No NaN or infinity anywhere in a JSON-ready value."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(all_finite(v) for v in value)
    return True


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def finite_json(value, **options) -> str:
    """JSON with NaN and infinities written as null: json.dumps would write `NaN`, which is not JSON."""
    return json.dumps(_finite(value), allow_nan=False, **options)


def atomic_write(path: str | Path, write: Callable[[str], None], elsewhere: bool = True) -> None:
    """Call `write(tmp_path)` to produce the file, then move it over `path` in one rename (`elsewhere`: see
    storage_error)."""
    path = Path(path)
    tmp, made = None, False
    try:
        while not made:
            tmp = str(path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp")
            note(Path(tmp))  # before it exists: a kill from here on leaves a file the next writer may remove
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                made = True
            except FileExistsError:  # (a name already taken: another)
                unnote(Path(tmp))
        try:
            os.fchmod(fd, FILE_MODE)  # made 0600; the file gets what open() would give it
        finally:
            os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if made and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.errno in STORAGE_ERRORS:
            raise storage_error(path, err, elsewhere) from None
        raise
    finally:
        if tmp is not None:
            unnote(Path(tmp))


def atomic_write_text(path: str | Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def append_text(path: str | Path, text: str) -> None:
    """Append to a log file; a torn last line (a crash mid-write) is for the reader to drop."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        if err.errno in STORAGE_ERRORS:
            raise storage_error(path, err) from None
        raise


def publish(stage: Path, target: Path, last: str | None = None) -> None:
    """Move every file of the directory `stage` into `target` (the file named `last` last),
    then remove `stage`. Renames only: nothing here can run out of space."""
    names = sorted(p.name for p in stage.iterdir())
    if last in names:
        names.remove(last)
        names.append(last)
    for name in names:
        os.replace(stage / name, target / name)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves reach the disk
    finally:
        os.close(fd)
    stage.rmdir()


def discard(stage: Path) -> None:
    shutil.rmtree(stage, ignore_errors=True)
