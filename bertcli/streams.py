"""The process's standard streams as a command-line program finds them: closed (`<&-`, `>&-`,
`2>&-`), left open the wrong way round by a launcher, or with a reader that goes away (`| head`).

`guard()` runs first in `bertcli.cli.main`: a descriptor 0, 1 or 2 that cannot be used is pointed
at /dev/null, so that no file bertcli opens later takes its number (messages and C-level warnings
would land in it), and stderr is wrapped so that a closed reader never stops a training run.
"""

from __future__ import annotations

import fcntl
import io
import os
import sys
from dataclasses import dataclass


@dataclass
class Closed:
    """Which standard streams this process started without."""

    stdin: bool = False
    stdout: bool = False


def _usable(fd: int, modes: tuple[int, ...]) -> bool:
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE in modes
    except OSError:
        return False


def _is_descriptor(stream, fd: int) -> bool:
    """Whether `stream` is the process's own stream on descriptor `fd` (not a test's stand-in)."""
    try:
        return stream is not None and stream.fileno() == fd
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def guard() -> Closed:
    """Point unusable descriptors 0-2 at /dev/null, and make sys.stdin None, sys.stdout and
    sys.stderr /dev/null where they stood on such a descriptor. Returns what was closed."""
    closed = Closed()
    shut = [fd for fd, modes in ((0, (os.O_RDONLY, os.O_RDWR)), (1, (os.O_WRONLY, os.O_RDWR)),
                                 (2, (os.O_WRONLY, os.O_RDWR))) if not _usable(fd, modes)]
    streams = {0: sys.stdin, 1: sys.stdout, 2: sys.stderr}
    for fd in shut:
        devnull = os.open(os.devnull, os.O_RDWR)
        if devnull != fd:
            os.dup2(devnull, fd)
            os.close(devnull)
    if sys.stdin is None or (0 in shut and _is_descriptor(streams[0], 0)):
        sys.stdin = None  # predict and tokenize show say that stdin is closed
        closed.stdin = True
    if sys.stdout is None or (1 in shut and _is_descriptor(streams[1], 1)):
        sys.stdout = open(os.devnull, "w")
        closed.stdout = True
    if sys.stderr is None or (2 in shut and _is_descriptor(streams[2], 2)):
        sys.stderr = open(os.devnull, "w")
    if _is_descriptor(sys.stderr, 2) and not isinstance(sys.stderr, Messages):
        sys.stderr = Messages(sys.stderr)
    return closed


class Messages(io.TextIOBase):
    """stderr that a closed reader, or a full disk under its file, cannot stop: a training run piped into
    `| head`, or a scheduler's log on a full disk, keeps training and saving (its exit code still tells how
    it ended). On the first such failure the descriptor is pointed at /dev/null and the writes go on there."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            self._lost(err)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            self._lost(err)

    def _lost(self, err: OSError) -> None:
        from bertcli.fileio import STORAGE_ERRORS

        if not isinstance(err, BrokenPipeError) and err.errno not in STORAGE_ERRORS:
            raise err
        self._silence()

    def _silence(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._stream.fileno())
        os.close(devnull)

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:
        return self._stream.encoding


def drop_stdout() -> None:
    """Point stdout at /dev/null, so that Python's flush at exit does not fail a second time."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
