"""Rows of TSV, CSV and JSONL files as dicts, with errors that name the file and line."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Iterator, Sequence

from bertcli.errors import DataError
from bertcli.textio import MAX_LINE_BYTES, decode_text, line_too_long, load_json, split_lines


MAX_DOCUMENT_BYTES = 4 << 30  # a whole-file format (SQuAD JSON) read into memory: SQuAD v2 train is 40 MB
_CHUNK = 1 << 20


def read_text(path: str | Path, one_example_per_line: bool = True) -> str:
    """The whole file as text, read once as a stream (a pipe or `<(...)` works too). Invalid UTF-8
    and NUL bytes are reported with their line and offset, and so is a line over MAX_LINE_BYTES in
    a line-oriented file, as soon as it is met: a device such as /dev/zero is never read to its end."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: file not found")
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a file")
    chunks: list[bytes] = []
    size, lines, since_break = 0, 1, 0  # bytes read, line number at the chunk's start, bytes since the last \n
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                if b"\x00" in chunk:  # binary: stop here (a device is never read to its end), naming the first bad byte
                    decode_text(b"".join(chunks) + chunk, str(path))
                if one_example_per_line:
                    pieces = chunk.split(b"\n")
                    for number, piece in enumerate(pieces[:-1] if len(pieces) > 1 else []):
                        if since_break + len(piece) > MAX_LINE_BYTES:
                            raise line_too_long(f"{path}: line {lines + number}", since_break + len(piece))
                        since_break = 0
                    since_break += len(pieces[-1])
                    if since_break > MAX_LINE_BYTES:
                        where = f"{path}: line {lines + len(pieces) - 1}"
                        raise line_too_long(where, since_break + _rest_of_line(f, p))
                elif size + len(chunk) > MAX_DOCUMENT_BYTES:
                    raise DataError(f"{path}: over {MAX_DOCUMENT_BYTES:,} bytes, too large to read as one document")
                chunks.append(chunk)
                size += len(chunk)
                lines += chunk.count(b"\n")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    return decode_text(b"".join(chunks), str(path)).removeprefix("\ufeff")


def _rest_of_line(f, path: Path) -> int:
    """Bytes up to the next line break, counted without keeping them (a regular file only: a
    stream may never end)."""
    if not path.is_file():
        return 0
    count = 0
    for chunk in iter(lambda: f.read(_CHUNK), b""):
        end = chunk.find(b"\n")
        if end >= 0:
            return count + end
        count += len(chunk)
    return count


def json_lines(path: str | Path, text: str) -> bool:
    """Whether `text` read from `path` is JSON lines: by the name's suffix (.jsonl, .json), or for a name
    without one (a pipe: /dev/stdin, <(...)) by its first character."""
    suffix = Path(path).suffix.lower()
    return suffix in (".jsonl", ".json") if suffix else text.lstrip().startswith("{")


def read_jsonl(path: str | Path, text: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of JSONL `text` read from `path`."""
    for number, line in enumerate(split_lines(text), start=1):
        if not line.strip():
            continue
        try:
            row = load_json(line)
        except (ValueError, RecursionError) as err:
            raise DataError(f"{path}: line {number}: cannot be read as JSON ({err})") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {number}: expected a JSON object")
        yield number, row


def _csv_rows(path: str | Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(the line it starts on, fields) for each CSV record: a quoted field may hold line breaks."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    try:
        for fields in reader:
            yield start, fields
            start = reader.line_num + 1
    except csv.Error as err:
        raise DataError(f"{path}: line {reader.line_num}: not valid CSV ({err})") from None


def _tsv_rows(path: str | Path, text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) for each line: tab-separated, no quoting (GLUE)."""
    for number, line in enumerate(split_lines(text), start=1):
        if number == 1 and "\r" in line:  # old Mac line endings: the whole file is its first line (a \r in a
            raise stray_carriage_return(path, number)  # later cell is read as the space it stands for)
        yield number, line.split("\t")


def stray_carriage_return(path: str | Path, number: int) -> DataError:
    return DataError(f"{path}: line {number}: a carriage return (\\r) inside the line: lines must end in \\n or "
                     "\\r\\n (a file with old Mac line endings? `tr '\\r' '\\n'` converts it)")


def read_rows(path: str | Path, columns: Sequence[str] = (), header_line: dict | None = None
              ) -> Iterator[tuple[int, dict]]:
    """(line number, row) pairs. `.jsonl`/`.json` hold one JSON object per line (so does a pipe whose text
    starts with `{`); `.csv` is comma-separated with quoting; anything else is tab-separated without
    quoting (GLUE). The first row names the columns (its line number goes into `header_line["line"]`, for
    messages about them), or `columns` does for a file without a header row."""
    text = read_text(path)
    suffix = Path(path).suffix.lower()
    if json_lines(path, text):
        if columns:
            raise DataError(f"{path}: JSON lines name their fields; task.columns is for TSV and CSV files without a "
                            "header row")
        yield from read_jsonl(path, text)
        return
    reader = _csv_rows(path, text) if suffix == ".csv" else _tsv_rows(path, text)
    header = list(columns) or None
    first = True
    for number, fields in reader:
        if first and columns and any(f.strip().lower() == c.strip().lower() for f, c in zip(fields, columns)):
            raise DataError(f"{path}: line {number}: a header row ({', '.join(fields)}), as a field is named as its "
                            "column, but task.columns is for a file without one: remove task.columns and the header "
                            "names the columns")
        first = False
        if header is None:
            header = [h.strip() for h in fields]
            if not any(header):
                raise DataError(f"{path}: line {number}: expected a header row with column names")
            twice = sorted({h for h in header if h and header.count(h) > 1})
            if twice:
                raise DataError(f"{path}: line {number}: the header names {', '.join(map(repr, twice))} more than "
                                "once; each column needs a name of its own")
            if header_line is not None:
                header_line["line"] = number
            continue
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(header):
            named = "task.columns names" if columns else "the header has"
            raise DataError(f"{path}: line {number}: {len(fields)} columns, but {named} {len(header)} "
                            f"({', '.join(header)})")
        yield number, dict(zip(header, fields))
    if header is None:
        raise DataError(f"{path}: the file is empty")
