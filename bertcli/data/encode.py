"""Raw text -> token shards, at any size: each file is read as a stream in blocks, cut into shards
of about SHARD_TEXT_BYTES of text at document boundaries, and every finished shard is recorded in
the side directory's progress.json, so memory stays flat however large the corpus, and an encode
stopped midway (Ctrl-C, SIGTERM, a kill, a bad byte) continues with --resume from its last shard.

A shard's record names its source file, its byte range and that range's SHA-256; resuming checks
the text against them (a changed file is refused, never mixed in) and each kept shard's files
against their recorded sizes and offsets. The layout of the finished directory is corpus.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys
import threading
from itertools import chain
from pathlib import Path
from typing import BinaryIO, Callable

import numpy as np

from bertcli.data.corpus import (FORMAT, MAX_CORPUS_LINE_BYTES, file_sha256, open_shard, split_sentences,
                                 tokenizer_sha256)
from bertcli.errors import DataError, Interrupted
from bertcli.fileio import atomic_write_text, discard, note, publish, unnote
from bertcli.rundir import STAGE_DIR
from bertcli.textio import decode_text, read_once
from bertcli.tokenizer import WordPieceTokenizer

SHARD_TEXT_BYTES = 64 << 20  # text per shard (cut at the next document boundary)
DOCUMENT_CHARS = 1 << 20  # a document runs no longer: text without blank lines is cut at the end of that line
READ_BYTES = 1 << 20
BATCH_SENTENCES = 20_000  # sentences per call of the tokenizer (which spreads them over all cores)
PROGRESS = "progress.json"
_BLANK_LINE = re.compile(rb"^[ \t\r\f\v]*\n", re.MULTILINE)
_SUFFIXES = ("tokens.bin", "sentences.npy", "documents.npy", "words.bin")


def word_continuations(sentence: str, offsets: list[tuple[int, int]], segment) -> list[int]:
    """1 where a token continues the word of the token before it, by the segmenter's words
    (for Chinese, where each character is a token, jieba groups them into words)."""
    word_of = [-1] * (len(sentence) + 1)
    for number, (_, start, end) in enumerate(segment(sentence)):
        word_of[start:end] = [number] * (end - start)
    flags, previous = [], -2
    for start, _ in offsets:
        word = word_of[start] if start < len(word_of) else -1
        flags.append(int(word == previous and word >= 0))
        previous = word
    return flags


def segmenter_for(name: str | None):
    if name in (None, "none"):
        return None
    if name != "jieba":
        raise DataError(f"unknown word segmenter {name!r} (choices: none, jieba)")
    try:
        import jieba
    except ImportError:
        raise DataError("the jieba segmenter is not installed: pip install -e '.[zh]' in bertcli's clone") from None
    jieba.setLogLevel(60)
    return jieba.tokenize


class _Reader:
    """A text file's documents (lists of sentences), read in blocks from byte `offset`, line `line` on.
    `on_bytes` sees every byte once, in order. A line over MAX_CORPUS_LINE_BYTES is never held whole.
    Where documents and shards end depends on the text alone, never on where a block of it falls, so that
    an encode resumed from a shard's end cuts exactly where one that was never stopped did."""

    def __init__(self, f: BinaryIO, name: str, offset: int, line: int, on_bytes: Callable[[bytes], None]):
        self.f, self.name, self.offset, self.line, self.on_bytes = f, name, offset, line, on_bytes
        self.carry, self.lines, self.chars, self.cut, self.done, self.broke = b"", [], 0, False, False, False
        self.long_documents = 0  # cut at DOCUMENT_CHARS where text went on without a blank line
        self.cut_long = False  # the last document was cut there: counted if a line of text comes next

    def read(self, cut_at: int) -> list[list[str]]:
        """The documents that the next block of text ends. Reading stops at the first end of a line at or
        after byte `cut_at` of the file where no document is open (after a blank line, or where a long
        document was split), and `self.cut` says whether it did: a shard may end there."""
        self.cut = False
        data = self.f.read(READ_BYTES)
        if not data:
            self.done = True
            rest, self.carry = self.carry, b""
            return self._documents(rest, final=True)
        data = self.carry + data  # (it starts a line: a block is used up to its last line break)
        end = data.rfind(b"\n") + 1
        first = blank = None  # the first line that ends at or after cut_at, and the first blank line from there
        if end and cut_at - self.offset <= end:
            first = data.rfind(b"\n", 0, max(0, cut_at - self.offset - 1)) + 1
            blank = _BLANK_LINE.search(data, first, end)
            end = blank.end() if blank else end
        self.carry = data[end:]
        if len(self.carry) > MAX_CORPUS_LINE_BYTES and b"\n" not in self.carry:
            number = self.line + data.count(b"\n", 0, end) + 1
            raise DataError(f"{self.name}: line {number}: over "
                            f"{MAX_CORPUS_LINE_BYTES:,} bytes without a line break; is this a text file?")
        self.broke = False
        documents = self._documents(data[:end], final=False, first=first) if end else []
        # a shard ends only at a place found from `first` on: a line of other blanks (U+3000) ends a document
        # too, but at a block's end where blocks happened to fall
        self.cut = (blank is not None or self.broke) and not self.lines
        return documents

    def _documents(self, raw: bytes, final: bool, first: int | None = None) -> list[list[str]]:
        """The documents `raw` ends. Given `first` (a byte of `raw` where a line starts), it stops after
        the first line from there on where a long document is split, and what follows goes back to `carry`."""
        text = decode_text(raw, self.name, self.offset, first_line=self.line + 1)
        if self.offset == 0:
            text = text.removeprefix("\ufeff")
        lines = text.split("\n")
        if not final:
            lines.pop()  # what follows the block's last line break: nothing
        eligible = raw.count(b"\n", 0, first) if first is not None else len(lines)
        documents, used = [], len(raw)
        for number, line in enumerate(lines):
            line = line.strip()
            self.long_documents += bool(line) and self.cut_long  # text went on: the cut split a document
            self.cut_long = False  # (a blank line or the end next: the document ended there anyway)
            if line:
                self.lines.append(line)
                self.chars += len(line)
                if self.chars >= DOCUMENT_CHARS:
                    self.cut_long = True  # a document this long is split at the end of the line
                    documents.append(self._end_document())
                    if number >= eligible:  # a shard may end here: the rest is read again
                        used, self.broke = _line_end(raw, first, number - eligible), True
                        break
            elif self.lines:
                documents.append(self._end_document())
        if final and self.lines:
            documents.append(self._end_document())
        self.carry = raw[used:] + self.carry
        raw = raw[:used]
        self.on_bytes(raw)
        self.offset += len(raw)
        self.line += raw.count(b"\n")
        return [d for d in documents if d]

    def _end_document(self) -> list[str]:
        sentences = split_sentences(" ".join(self.lines))
        self.lines, self.chars = [], 0
        return sentences


def _line_end(raw: bytes, start: int, lines: int) -> int:
    """The byte after the line break that ends the `lines`-th line (from 0) from byte `start` on."""
    for _ in range(lines + 1):
        start = raw.index(b"\n", start) + 1
    return start


class _ShardWriter:
    """One shard being written: token ids go to disk as each batch is encoded; the sentence and document
    offsets are kept as arrays (8 bytes a sentence, a shard's worth) until `finish` writes them."""

    def __init__(self, stem: Path, tokenizer: WordPieceTokenizer, dtype, segment, start: int):
        self.stem, self.tokenizer, self.dtype, self.segment, self.start = stem, tokenizer, dtype, segment, start
        self.sink = open(f"{stem}.tokens.bin", "wb")
        self.words = open(f"{stem}.words.bin", "wb") if segment else None
        self.pending: list[str] = []
        self.ends: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
        self.per_document: list[int] = []
        self.tokens = 0
        self.text_bytes = 0  # of the source, for the cut

    def add(self, documents: list[list[str]]) -> None:
        for sentences in documents:
            self.pending.extend(sentences)
            self.per_document.append(len(sentences))
        if len(self.pending) >= BATCH_SENTENCES:
            self._flush()

    def _flush(self) -> None:
        if not self.pending:
            return
        backend = self.tokenizer.backend  # without a segmenter no offsets are needed: the faster call skips them
        encode = backend.encode_batch if self.words is not None else getattr(backend, "encode_batch_fast",
                                                                              backend.encode_batch)
        encodings = encode(self.pending, add_special_tokens=False)
        ids = [e.ids for e in encodings]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        count = int(lengths.sum())
        np.fromiter(chain.from_iterable(ids), dtype=self.dtype, count=count).tofile(self.sink)
        if self.words is not None:
            flags = [f for text, e in zip(self.pending, encodings)
                     for f in word_continuations(text, e.offsets, self.segment)]
            np.asarray(flags, dtype=np.uint8).tofile(self.words)
        self.ends.append(self.tokens + np.cumsum(lengths))
        self.tokens += count
        self.pending = []

    @property
    def documents(self) -> int:
        return len(self.per_document)

    def finish(self, end: int, sha256: str) -> dict:
        """Write the offsets, make every file durable, and return the shard's record."""
        self._flush()
        for f in (self.sink, self.words):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        sentences = np.concatenate(self.ends)
        documents = np.concatenate([[0], np.cumsum(np.asarray(self.per_document, dtype=np.int64))])
        for name, array in (("sentences", sentences), ("documents", documents)):
            with open(f"{self.stem}.{name}.npy", "wb") as f:
                np.save(f, array.astype(np.int64), allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())
        return {"name": self.stem.name, "bytes": [self.start, end], "sha256": sha256, "documents": self.documents,
                "sentences": len(sentences) - 1, "tokens": self.tokens, "sizes": _sizes(self.stem)}

    def abandon(self) -> None:
        for f in (self.sink, self.words):
            if f is not None:
                f.close()
        for suffix in _SUFFIXES:
            Path(f"{self.stem}.{suffix}").unlink(missing_ok=True)


def _sizes(stem: Path) -> dict[str, int]:
    return {s: Path(f"{stem}.{s}").stat().st_size for s in _SUFFIXES if Path(f"{stem}.{s}").is_file()}


def _settings(tokenizer: WordPieceTokenizer, dtype, segmenter: str | None) -> dict:
    return {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tokenizer.vocab_size,
            "segmenter": segmenter, "tokenizer_sha256": tokenizer_sha256(tokenizer)}


def _kept(stage: Path, settings: dict, files: list[Path]) -> tuple[list[dict], list[dict]]:
    """The shards an interrupted encode of the same settings finished, whose files are whole: its
    progress.json's records, up to the first shard whose files do not match (that one and the rest
    are removed), and the records of the input files it finished. Anything else in the stage is a
    shard killed midway, removed too."""
    try:
        progress = json.loads((stage / PROGRESS).read_text(encoding="utf-8"))
        records, finished = progress["shards"], progress["files"]
        same = {k: progress.get(k) for k in settings} == settings
        if not (isinstance(records, list) and isinstance(finished, list) and all(
                isinstance(f, dict) and isinstance(f["sha256"], str) and isinstance(f["bytes"], int) for f in finished)):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{stage / PROGRESS}: unreadable record of the interrupted encode; start afresh with "
                        "--overwrite") from None
    if not same:
        differs = ", ".join(k for k in settings if progress.get(k) != settings[k])
        raise DataError(f"{stage.parent}: the interrupted encode used another {differs}; resume it with the same "
                        "tokenizer and segmenter, or start afresh with --overwrite")
    kept: list[dict] = []
    for number, record in enumerate(records):
        stem = stage / f"{number:05d}"
        try:
            file, (start, end) = record["file"], record["bytes"]
            if kept and file == kept[-1]["file"]:
                follows = start == kept[-1]["bytes"][1]
            else:  # a file's first shard
                follows = start == 0 and file == (kept[-1]["file"] + 1 if kept else 0)
            whole = (follows and end > start and file <= len(finished) and file < len(files)
                     and record["name"] == stem.name and _sizes(stem) == record["sizes"]
                     and _whole(stem, settings["dtype"]))
        except (KeyError, TypeError, ValueError):
            whole = False
        if not whole:
            break
        kept.append(record)
    if len(kept) < len(records):  # files from the first dropped shard's on are not finished
        dropped = records[len(kept)]
        finished = finished[:dropped["file"] if isinstance(dropped, dict) and isinstance(dropped.get("file"), int) else 0]
    names = {f"{r['name']}.{s}" for r in kept for s in _SUFFIXES}
    for entry in stage.iterdir():
        if entry.name != PROGRESS and entry.name not in names:
            entry.unlink()
    return kept, finished


def _whole(stem: Path, dtype: str) -> bool:
    try:
        open_shard(stem, np.dtype(dtype))
    except DataError:
        return False
    return True


def _verify(f: BinaryIO, path: Path, record: dict, file_digest, on_bytes) -> int:
    """Read the shard's range of the text (nothing is tokenized) and check it is what was encoded;
    returns the range's line breaks."""
    start, end = record["bytes"]
    digest, left, lines = hashlib.sha256(), end - start, 0
    while left:
        chunk = f.read(min(READ_BYTES, left))
        if not chunk:
            break
        left -= len(chunk)
        digest.update(chunk)
        file_digest.update(chunk)
        lines += chunk.count(b"\n")
        on_bytes(len(chunk))
    if left or digest.hexdigest() != record["sha256"]:
        raise DataError(f"{path}: bytes {start:,}-{end:,} are not the text the interrupted encode read (the file "
                        "changed); encode it afresh with --overwrite")
    return lines


class _Stopped:
    """SIGTERM during an encode raises KeyboardInterrupt, as Ctrl-C does, so what was finished is kept."""

    def __init__(self):
        self.signum: int | None = None
        self.previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def encode_corpus(tokenizer: WordPieceTokenizer, files: list[Path], out: Path, show_progress: bool = True,
                  segmenter: str | None = None, resume: bool = False, strict: bool = True,
                  again: str = "run the same command with --resume") -> dict:
    """Encode text files into the shard directory `out`, which the caller has claimed
    (bertcli.rundir.claim): shards are written into the side directory, recorded there as each one is
    finished, and moved in by renames once all are, index.json last. A pipe or `<(...)` works too (each
    file is read once, in order). `resume` keeps what an interrupted encode of the same text and
    tokenizer finished. With a word `segmenter` (jieba, for Chinese whole-word masking),
    `NNNNN.words.bin` marks the tokens that continue a word. Stopped, it keeps its finished shards and
    raises Interrupted (130 for Ctrl-C, 143 for SIGTERM), saying `again` continues it. Not `strict` (bertcli's
    own cache), a record that cannot be resumed is dropped and the encode starts afresh instead of refusing."""
    segment = segmenter_for(segmenter)
    for f in files:
        if not f.exists() or f.is_dir():
            raise DataError(f"{f}: {'is a directory, expected a text file' if f.is_dir() else 'file not found'}")
    read_once(files)
    dtype = np.uint16 if tokenizer.id_limit <= 65536 else np.uint32
    settings = _settings(tokenizer, dtype, segmenter if segment else None)
    stage = out / STAGE_DIR  # (claim removed a killed writer's, unless resuming)
    records: list[dict] = []
    sources: list[dict] = []  # the input files finished
    if resume and (stage / PROGRESS).is_file():
        try:
            records, sources = _kept(stage, settings, files)
        except DataError:
            if strict:
                raise
    if not records:
        sources = []
        discard(stage)
        note(stage)  # (it stays noted while it exists: --resume continues it, and --overwrite removes it)
        stage.mkdir(parents=True)
    kept = len(records)
    bar = _Bar(show_progress, files)
    with _Stopped() as stopped:
        try:
            with bar:
                for number, path in enumerate(files):
                    if number < len(sources):  # finished before: checked whole, not encoded again
                        _verify_file(path, sources[number], bar.advance)
                        continue
                    sources.append(_encode_file(tokenizer, number, path, stage, dtype, segment, settings, records,
                                                sources, bar))
                    _record(stage, settings, records, sources)
        except BaseException as err:
            if len(records) == 0:
                discard(stage)
                unnote(stage)
            if isinstance(err, KeyboardInterrupt):
                signum = stopped.signum or signal.SIGINT
                done = sum(r["bytes"][1] - r["bytes"][0] for r in records)
                what = (f"{len(records)} shard(s), {done / 1e6:,.1f} MB of text, kept in {out} ({len(records) - kept} "
                        f"new); {again} to continue" if records else "nothing was kept")
                raise Interrupted(f"encode: stopped by {'SIGTERM' if signum == signal.SIGTERM else 'Ctrl-C'}; {what}",
                                  exit_code=128 + signum) from None
            raise
    totals = {k: sum(r[k] for r in records) for k in ("documents", "sentences", "tokens")}
    index = {**settings, **totals, "sources": sources, "shards": records}
    (stage / PROGRESS).unlink()
    atomic_write_text(stage / "index.json", json.dumps(index, indent=2) + "\n")
    publish(stage, out, last="index.json")
    unnote(stage)
    return index


def _record(stage: Path, settings: dict, records: list[dict], sources: list[dict]) -> None:
    atomic_write_text(stage / PROGRESS, json.dumps({**settings, "shards": records, "files": sources}) + "\n")


def _verify_file(path: Path, record: dict, on_bytes) -> None:
    size = 0

    def seen(n: int) -> None:
        nonlocal size
        size += n
        on_bytes(n)

    if file_sha256(path, seen) != record["sha256"] or size != record["bytes"]:
        raise DataError(f"{path}: not the text the interrupted encode read (the file changed); encode it afresh "
                        "with --overwrite")


def _encode_file(tokenizer, number: int, path: Path, stage: Path, dtype, segment, settings: dict,
                 records: list[dict], sources: list[dict], bar: "_Bar") -> dict:
    """Encode one file into shards appended to `records` (resuming after those of this file already
    there, `sources` being the files finished before it); returns the file's record."""
    file_digest, shard_digest = hashlib.sha256(), hashlib.sha256()
    mine = [r for r in records if r.get("file") == number]
    offset = lines = 0

    def seen(chunk: bytes) -> None:
        file_digest.update(chunk)
        shard_digest.update(chunk)
        bar.advance(len(chunk))

    with open(path, "rb") as f:
        for record in mine:  # (in order, from byte 0: _kept checked)
            lines += _verify(f, path, record, file_digest, bar.advance)
            offset = record["bytes"][1]
        if mine and mine[-1].get("eof") and f.read(1):
            raise DataError(f"{path}: longer than when the interrupted encode read it to its end (the file changed); "
                            "encode it afresh with --overwrite")
        reader = _Reader(f, str(path), offset, lines, seen)
        writer = None
        try:
            while not reader.done:
                if writer is None:
                    writer = _ShardWriter(stage / f"{len(records):05d}", tokenizer, dtype, segment, reader.offset)
                    shard_digest = hashlib.sha256()
                writer.add(reader.read(cut_at=writer.start + SHARD_TEXT_BYTES))
                if (reader.cut or reader.done) and writer.documents:
                    records.append({"file": number, "path": str(path), "eof": reader.done,
                                    **writer.finish(reader.offset, shard_digest.hexdigest())})
                    _record(stage, settings, records, sources)
                    writer = None
        except BaseException:
            if writer is not None:
                writer.abandon()
            raise
        if writer is not None:  # only blank lines after the last document: nothing to keep
            writer.abandon()
    if reader.long_documents:
        sys.stderr.write(f"{path}: {reader.long_documents} document(s) ran over {DOCUMENT_CHARS:,} characters without "
                         "a blank line and were split (blank lines separate documents)\n")
    mine = [r for r in records if r["file"] == number]
    counts = {k: sum(r[k] for r in mine) for k in ("documents", "sentences", "tokens")}
    if counts["sentences"] == 0:
        raise DataError(f"{path}: no text to encode")
    return {"path": str(path), "sha256": file_digest.hexdigest(), "bytes": reader.offset, **counts}


class _Bar:
    """The progress line on stderr (a terminal only): bytes read, bytes/s and the time left."""

    def __init__(self, show: bool, files: list[Path]):
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        console = Console(stderr=True, markup=False, emoji=False)
        self.progress = Progress(TextColumn("encoding"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=console, disable=not (show and console.is_terminal))
        regular = all(f.is_file() for f in files)
        self.task = self.progress.add_task("encode", total=sum(f.stat().st_size for f in files) if regular else None)

    def advance(self, size: int) -> None:
        self.progress.advance(self.task, size)

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)
