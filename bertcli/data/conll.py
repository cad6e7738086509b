"""NER data: CoNLL columns and JSONL {"tokens": [...], "tags": [...]}; tags in BIO (IOB2), IOB1
or BIOES are read and normalised to BIO."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

from bertcli.data.tables import json_lines, read_jsonl, read_text, stray_carriage_return
from bertcli.errors import DataError
from bertcli.textio import split_lines
from bertcli.metrics import get_entities

TAG = re.compile(r"^(O|[BIES]-\S+)$")
COLUMNS = re.compile(r"[ \t]+")  # ASCII spaces and tabs: a no-break space or U+2028 is part of a token


@dataclass(frozen=True)
class Sentence:
    words: tuple[str, ...]
    tags: tuple[str, ...]  # BIO
    where: str


def to_bio(tags: list[str]) -> list[str]:
    """Any of IOB2, IOB1, BIOES -> IOB2, through the entities the tags describe."""
    out = ["O"] * len(tags)
    for kind, first, last in get_entities(tags):
        out[first] = f"B-{kind}"
        for i in range(first + 1, last + 1):
            out[i] = f"I-{kind}"
    return out


def read_ner(path: str | Path) -> list[Sentence]:
    text = read_text(path)
    if json_lines(path, text):
        return _read_jsonl(path, text)
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    columns = None
    start = 1

    def flush() -> None:
        nonlocal words, tags
        if words:
            sentences.append(Sentence(tuple(words), tuple(to_bio(tags)), f"{path}: line {start}"))
        words, tags = [], []

    for number, line in enumerate(split_lines(text), start=1):
        if "\r" in line:
            raise stray_carriage_return(path, number)
        bare = line.strip(" \t\ufeff")  # a byte-order mark left inside a file (WNUT-17 dev has one) is no text
        fields = COLUMNS.split(bare) if bare else []
        if not fields:
            flush()
            continue
        if fields[0] == "-DOCSTART-":
            flush()
            continue
        if columns is None:
            columns = len(fields)
            if columns < 2:
                raise DataError(f"{path}: line {number}: expected a token and a tag (CoNLL columns), got {line!r}")
        if len(fields) != columns:
            raise DataError(f"{path}: line {number}: {len(fields)} columns, but the file's first line has {columns}: "
                            f"{line[:80]!r}")
        tag = fields[-1]
        if not TAG.match(tag):
            raise DataError(f"{path}: line {number}: unknown tag {tag!r} (expected O, or B-/I-/E-/S- and a type)")
        if not words:
            start = number
        words.append(fields[0])
        tags.append(tag)
    flush()
    if not sentences:
        raise DataError(f"{path}: no sentences")
    return sentences


def _read_jsonl(path: str | Path, text: str) -> list[Sentence]:
    sentences, empty = [], []
    for number, row in read_jsonl(path, text):
        words, tags = row.get("tokens"), row.get("tags")
        if not isinstance(words, list) or not isinstance(tags, list) or not all(isinstance(w, str) for w in words):
            raise DataError(f"{path}: line {number}: expected {{\"tokens\": [strings], \"tags\": [strings]}}")
        if len(words) != len(tags):
            raise DataError(f"{path}: line {number}: {len(words)} tokens but {len(tags)} tags")
        bad = next((t for t in tags if not isinstance(t, str) or not TAG.match(t)), None)
        if bad is not None:
            raise DataError(f"{path}: line {number}: unknown tag {bad!r} (expected O, or B-/I-/E-/S- and a type)")
        if words:
            sentences.append(Sentence(tuple(words), tuple(to_bio(tags)), f"{path}: line {number}"))
        else:
            empty.append(number)
    if not sentences:
        raise DataError(f"{path}: no sentences")
    if empty:
        sys.stderr.write(f"{path}: {len(empty)} line(s) with no tokens left out (first: line {empty[0]})\n")
    return sentences
