"""Reading text line by line from files and pipes, with errors that name the line and byte.

Every reader of line-oriented text splits lines here, on `\n` alone (`split_lines`), and streams
(`raw_lines`) read the file descriptor directly, in pieces as they arrive, with no line ever held
whole past MAX_LINE_BYTES.
"""

from __future__ import annotations

import io
import json
import os
import select
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from bertcli.errors import DataError

MAX_LINE_BYTES = 1 << 20  # one example per line: a longer line means the wrong file, or one without line breaks
_PIECE = 1 << 16
MAX_SKIPPED_BYTES = 64 << 20  # an over-long line is skipped as it streams by, up to here


def load_json(text: str) -> object:
    """json.loads, refusing a lone surrogate escape (`"\\ud800"`): JSON lets it be written, but it is no
    character, and no text can hold it (a tokenizer, UTF-8 output). ValueError or RecursionError."""
    value = json.loads(text)
    if "\\u" in text:  # (text read as UTF-8 holds no surrogate but an escaped one)
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(f"a lone surrogate escape (\\u{ord(err.object[err.start]):04x}), which is no "
                             "character") from None
    return value


class TooLong(int):
    """Stands for a line over MAX_LINE_BYTES (its length in bytes), which is never held in memory whole."""


def is_stream(path: Path) -> bool:
    """A path that can be read only once: a FIFO, `<(...)`, /dev/stdin, a device."""
    return path.exists() and not path.is_file() and not path.is_dir()


def read_once(paths: list[Path]) -> None:
    """A pipe gives its text once: named twice, the second read would wait forever (DataError)."""
    seen: set[Path] = set()
    for path in paths:
        if is_stream(path):
            if path.resolve() in seen:
                raise DataError(f"{path}: a pipe named twice; it can be read only once")
            seen.add(path.resolve())


def distinct_files(paths: list[Path]) -> None:
    """The same file named twice in one list (`--corpus a.txt ./a.txt`, a link to it, a glob and its file)
    would count its text twice, unsaid (DataError)."""
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        try:
            info = path.stat()
        except OSError:
            continue  # (said where it is read)
        if not stat.S_ISREG(info.st_mode):
            continue  # a pipe: read_once
        first = seen.get((info.st_dev, info.st_ino))
        if first is not None:
            raise DataError(f"{path}: the same file as {first}, named before it; each file is read once (to count "
                            "a text twice, copy it)")
        seen[(info.st_dev, info.st_ino)] = path


def line_too_long(where: str, size: int) -> DataError:
    return DataError(f"{where}: the line is {size:,} bytes long, over the limit of {MAX_LINE_BYTES:,} for one "
                     f"example (is this the right file, with one example per line?)")


def split_lines(text: str) -> list[str]:
    """Lines split on \\n alone (a \\r before it is dropped). str.splitlines() also splits on U+2028,
    U+0085, \\x1c-\\x1e and more, which may stand inside a TSV cell or a sentence; a final \\n makes
    no empty last line."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _reader(stream: BinaryIO, source: str):
    """A function returning the next piece of the stream (b"" at its end). A real file descriptor
    is read with os.read, below Python's buffered reader: a thread blocked there holds no lock that
    the interpreter needs at exit (a blocked BufferedReader.readline aborts the exit). A
    descriptor left non-blocking by the caller is waited on; a failing read is a DataError."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        fd = None
    if fd is None:
        read1 = getattr(stream, "read1", None)
        return (lambda: read1(_PIECE)) if read1 else (lambda: stream.read(_PIECE))

    def read() -> bytes:
        while True:
            try:
                return os.read(fd, _PIECE)
            except BlockingIOError:
                select.select([fd], [], [])
            except OSError as err:
                raise DataError(f"{source}: cannot read: {err.strerror or err}") from None

    return read


def raw_lines(stream: BinaryIO, source: str = "input") -> Iterator[bytes | TooLong]:
    """The stream's lines as bytes without their \\n, each yielded as soon as it is complete; a line
    over MAX_LINE_BYTES is skipped as it streams by and stands as TooLong(its length)."""
    read = _reader(stream, source)
    pending = bytearray()
    skipped: int | None = None  # bytes of an over-long line so far
    for chunk in iter(read, b""):
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if skipped is not None:
                skipped += len(piece)
                if b"\x00" in piece or skipped > MAX_SKIPPED_BYTES:  # a device such as /dev/zero never ends a line
                    raise DataError(f"{source}: {skipped:,} bytes without a line break"
                                    f"{' and with NUL bytes' if 0 in piece else ''}: this is not text")
            else:
                pending += piece
                if len(pending) > MAX_LINE_BYTES:
                    skipped = len(pending)
                    pending.clear()
            if end < 0:
                break
            if skipped is not None:
                yield TooLong(skipped)
            else:
                yield bytes(pending)
            pending.clear()
            skipped = None
            start = end + 1
    if skipped is not None:
        yield TooLong(skipped)
    elif pending:
        yield bytes(pending)


def decode_text(data: bytes, source: str, offset: int = 0, line: int | None = None, first_line: int = 1) -> str:
    """Bytes as text: the one UTF-8 and NUL check of every reader. The first bad byte (invalid UTF-8,
    or a NUL) is a DataError naming its line and its byte offset in the file or stream, the one
    meaning a byte offset has. `offset`: where `data` starts in it; `line`: the line `data` is, when it
    is one line (else the line is counted up to the bad byte, from `first_line`, the line `data` starts)."""
    nul = data.find(b"\x00")
    try:
        text = data.decode("utf-8")
        bad = -1
    except UnicodeDecodeError as err:
        bad = err.start
    if nul < 0 and bad < 0:
        return text
    at = nul if bad < 0 or 0 <= nul < bad else bad
    number = line if line is not None else data.count(b"\n", 0, at) + first_line
    where = f"{source}: line {number}"
    if at == nul:
        raise DataError(f"{where}: NUL byte (byte offset {offset + at}); is this binary input?")
    raise DataError(f"{where}: not UTF-8 text (byte offset {offset + at})")


def decoded_line(raw: bytes | TooLong, source: str, start: int, number: int) -> str:
    """Line `number` of a stream (from raw_lines), which starts at byte `start`, as text: without a \r ending,
    and the first without its byte-order mark. Invalid UTF-8, a NUL byte or an over-long line raise DataError
    naming the line (and byte offset)."""
    if isinstance(raw, TooLong):
        raise line_too_long(f"{source}: line {number}", raw)
    text = decode_text(raw, source, start, number)
    return (text.removeprefix("\ufeff") if number == 1 else text).removesuffix("\r")
