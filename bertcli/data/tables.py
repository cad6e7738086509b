"""Rows of TSV, CSV and JSONL files as dicts, with errors that name the file and line."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from bertcli.errors import DataError


MAX_LINE_BYTES = 1 << 20  # one example per line: a longer line means the wrong file, or one without line breaks


def line_too_long(where: str, size: int) -> DataError:
    return DataError(f"{where}: the line is {size:,} bytes long, over the limit of {MAX_LINE_BYTES:,} for one "
                     f"example (is this the right file, with one example per line?)")


def _check_line_lengths(path: str | Path, data: bytes) -> None:
    if len(data) <= MAX_LINE_BYTES:
        return
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > MAX_LINE_BYTES:
            raise line_too_long(f"{path}: line {number}", end - start)
        start, number = end + 1, number + 1


def read_text(path: str | Path, one_example_per_line: bool = True) -> str:
    """The whole file as text; invalid UTF-8 and NUL bytes are reported with their offset, and
    so is a line over MAX_LINE_BYTES in a line-oriented file."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    data = p.read_bytes()
    if one_example_per_line:
        _check_line_lengths(path, data)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte offset {err.start})") from None
    if "\x00" in text:
        offset = data.index(b"\x00")
        line = data[:offset].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: NUL byte (byte offset {offset}); is this a binary file?")
    return text.removeprefix("\ufeff")


def read_jsonl(path: str | Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSONL `text` read from `path`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            raise DataError(f"{path}: line {number}: not valid JSON ({err})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object")
        yield number, row


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs. `.jsonl`/`.json` hold one JSON object per line; `.csv` is
    comma-separated with quoting; anything else is tab-separated without quoting (GLUE)."""
    text = read_text(path)
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        yield from read_jsonl(path, text)
        return
    lines = text.splitlines()
    if suffix == ".csv":
        reader = csv.reader(lines)
    else:
        reader = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = None
    for number, fields in enumerate(reader, start=1):
        if header is None:
            header = [h.strip() for h in fields]
            if not any(header):
                raise DataError(f"{path}: line 1: expected a header row with column names")
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(header):
            raise DataError(f"{path}: line {number}: {len(fields)} columns, but the header has {len(header)} "
                            f"({', '.join(header)})")
        yield number, dict(zip(header, fields))
    if header is None:
        raise DataError(f"{path}: the file is empty")
