"""Reading text line by line from files and pipes, with errors that name the line and byte."""

from __future__ import annotations

from typing import BinaryIO, Iterator

from bertcli.errors import DataError


def read_lines(stream: BinaryIO, source: str) -> Iterator[tuple[int, str]]:
    """Yield (line number from 1, text without its line ending) as lines arrive.
    Invalid UTF-8 raises DataError naming the line and the byte offset in the input."""
    offset = 0
    for number, raw in enumerate(iter(stream.readline, b""), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{source}: line {number}: not UTF-8 text (byte offset {offset + err.start})") from None
        if b"\x00" in raw:
            raise DataError(f"{source}: line {number}: NUL byte (byte offset {offset + raw.index(0)}); is this binary input?")
        offset += len(raw)
        if number == 1:
            text = text.removeprefix("\ufeff")
        yield number, text.rstrip("\r\n")
