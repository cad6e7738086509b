"""Pretraining corpora: token shards read back (memory-mapped), and raw text found in a recipe
encoded once into a cache (the encoding itself is encode.py's).

Text layout: blocks separated by blank lines are documents (one sentence per line with a blank
line between documents, the Google BERT layout, reads the same way); inside a document, lines
are joined and split into sentences after . ! ? (and 。！？ for Chinese).

A shard directory holds, per shard `NNNNN` (each input file gives one or more, cut at document
boundaries every 64 MB of text or so): `NNNNN.tokens.bin` (token ids, uint16 when the vocabulary
fits, else uint32), `NNNNN.sentences.npy` (token offsets of sentence starts, plus the end) and
`NNNNN.documents.npy` (sentence offsets of document starts, plus the end); and `index.json` with
counts, the tokenizer's hash, each source file's hash and each shard's byte range in its source.
"""

from __future__ import annotations

import hashlib
import json
import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bertcli.errors import DataError
from bertcli.textio import decode_text, is_stream, read_once
from bertcli.fileio import STORAGE_ERRORS, storage_error
from bertcli.rundir import STAGE_DIR, claim
from bertcli.scratch import locked_temp, swept
from bertcli.tokenizer import WordPieceTokenizer

FORMAT = "bertcli-shards-1"
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|(?<=[。！？])[”’」』）]*\s*")
MAX_CORPUS_LINE_BYTES = 64 << 20  # a paragraph, or a document laid out on one line


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def file_sha256(path: Path, on_bytes: Callable[[int], None] = lambda size: None) -> str:
    """The file's SHA-256, read a megabyte at a time (`on_bytes` is told each piece's size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            on_bytes(len(chunk))
    return digest.hexdigest()


_DIGESTS: dict[tuple, str] = {}  # (path, device, inode, size, mtime, ctime) -> SHA-256: a file is read once a process


def cached_sha256(path: Path) -> str:
    """file_sha256, once per version of a file in a process (a suite's runs, and a pretraining run's cache
    key and its record of its inputs, name the same files)."""
    info = path.stat()
    key = (str(path.resolve()), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)
    return _DIGESTS[key]


def tokenizer_sha256(tokenizer: WordPieceTokenizer) -> str:
    return hashlib.sha256(tokenizer.backend.to_str().encode("utf-8")).hexdigest()


@dataclass
class Shard:
    tokens: np.ndarray  # memory-mapped token ids
    sentences: np.ndarray  # token offset of each sentence start, plus the end
    documents: np.ndarray  # sentence offset of each document start, plus the end
    continues: np.ndarray | None = None  # 1 where a token continues a word (from a word segmenter)
    identity: str = ""  # what this shard is (its index, number, files' sizes and times): keys caches made from it


def _identity(index_sha256: str, stem: Path) -> str:
    digest = hashlib.sha256(index_sha256.encode())
    for suffix in ("tokens.bin", "sentences.npy", "documents.npy", "words.bin"):
        path = Path(f"{stem}.{suffix}")
        if path.is_file():
            info = path.stat()
            digest.update(f"{suffix}:{info.st_size}:{info.st_mtime_ns}:{info.st_ino}".encode())
    return f"{stem.name}:{digest.hexdigest()}"


class DamagedShards(DataError):
    """A shard directory whose files do not hold what its index says (missing, cut short, out of order): bertcli's
    own cache encodes its text again. A file that cannot be read now (too many open files, no memory) is not one."""


def load_shards(directory: Path, tokenizer: WordPieceTokenizer | None = None) -> list[Shard]:
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise DataError(f"{directory}: not a shard directory (no index.json; make one with `bertcli tokenize encode`)")
    try:
        text = index_path.read_text(encoding="utf-8")
        index = json.loads(text)
        if not isinstance(index, dict):
            raise ValueError(f"a JSON {type(index).__name__}, not an object")
        if index.get("format") != FORMAT:
            raise ValueError(f"format {index.get('format')!r}, expected {FORMAT!r}")
        dtype = np.dtype(index["dtype"])
        if dtype.kind != "u" or dtype.itemsize > 4:
            raise ValueError(f"token ids of dtype {dtype}, expected uint8, uint16 or uint32")
        count = len(index["shards"])
    except (ValueError, KeyError, TypeError) as err:
        raise DamagedShards(f"{index_path}: not a valid shard index ({err})") from None
    if tokenizer is not None and index.get("tokenizer_sha256") != tokenizer_sha256(tokenizer):
        raise DataError(f"{directory}: encoded with a different tokenizer than this model's (or with the same vocab.txt "
                        "alone, by a bertcli that read [MASK] written in the text as words); encode the text again")
    index_sha256 = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return [open_shard(directory / f"{n:05d}", dtype, _identity(index_sha256, directory / f"{n:05d}"))
            for n in range(count)]


def open_shard(stem: Path, dtype, identity: str = "") -> Shard:
    """A shard's files, memory-mapped, with its offsets checked (DataError names what is wrong)."""
    try:
        words = Path(f"{stem}.words.bin")
        shard = Shard(np.memmap(f"{stem}.tokens.bin", dtype=dtype, mode="r"),
                      np.load(f"{stem}.sentences.npy", allow_pickle=False, mmap_mode="r"),
                      np.load(f"{stem}.documents.npy", allow_pickle=False, mmap_mode="r"),
                      np.memmap(words, dtype=np.uint8, mode="r") if words.is_file() else None, identity)
    except FileNotFoundError as err:
        raise DamagedShards(f"{stem}: damaged shard ({err.filename} is missing); encode the text again") from None
    except ValueError as err:  # (numpy's: a file cut short, or not an array)
        raise DamagedShards(f"{stem}: damaged shard ({err}); encode the text again") from None
    except OSError as err:
        raise DataError(f"{stem}: cannot read the shard ({err.strerror})") from None
    problem = _shard_problem(shard)
    if problem:
        raise DamagedShards(f"{stem}: damaged shard ({problem}); encode the text again")
    return shard


def _shard_problem(shard: Shard) -> str | None:
    """What is wrong with a shard's offsets (the token ids are not scanned: that would read the
    whole corpus at start-up), or None."""
    for name, offsets, end in (("sentences", shard.sentences, len(shard.tokens)),
                               ("documents", shard.documents, len(shard.sentences) - 1)):
        if offsets.ndim != 1 or offsets.dtype.kind not in "iu" or len(offsets) < 1:
            return f"{name} offsets are not a list of integers"
        if offsets[0] != 0 or offsets[-1] != end or not _ascending(offsets):
            return f"{name} offsets do not run in order from 0 to {end}"
    if shard.continues is not None and len(shard.continues) != len(shard.tokens):
        return "word marks and tokens differ in number"
    return None


def _ascending(offsets: np.ndarray, step: int = 1 << 20) -> bool:
    """Whether the offsets never decrease, checked a piece at a time (they are memory-mapped: a
    corpus of gigabytes has a hundred MB of them)."""
    return all(not (np.diff(offsets[i:i + step + 1]) < 0).any() for i in range(0, max(len(offsets) - 1, 1), step))


def cache_dir() -> Path:
    """$BERTCLI_CACHE, or ~/.cache/bertcli where it is unset or empty (an empty one is not the current directory)."""
    return Path(os.environ.get("BERTCLI_CACHE") or Path.home() / ".cache" / "bertcli")


def shards_for(paths: list[str], tokenizer: WordPieceTokenizer, segmenter: str | None = None) -> list[Shard]:
    """Shards for a recipe's data paths: shard directories as they are; raw text files encoded
    on first use and cached, keyed by the files' content, the tokenizer and the segmenter. A pipe
    or `<(...)` is read once, into the cache, before it is hashed and encoded."""
    shards: list[Shard] = []
    for p in paths:
        if Path(p).is_dir():
            shards.extend(load_shards(Path(p), tokenizer))
    given = [Path(p) for p in paths if not Path(p).is_dir()]
    with spooled(given) as texts:
        if texts:
            key = hashlib.sha256(json.dumps([tokenizer_sha256(tokenizer), segmenter or "none"] +
                                            [cached_sha256(t) for t in texts]).encode())
            target = cache_dir() / "shards" / key.hexdigest()[:32]
            if not (target / "index.json").is_file():
                _encode_into_cache(texts, given, target, tokenizer, segmenter, again=False)
            try:
                cached = load_shards(target, tokenizer)
            except DamagedShards as err:  # bertcli's own cache, damaged (a disk, a hand): encoded again, once
                import sys

                sys.stderr.write(f"{err}\n(in bertcli's shard cache: its text is encoded again)\n")
                _encode_into_cache(texts, given, target, tokenizer, segmenter, again=True)
                cached = load_shards(target, tokenizer)
            shards.extend(cached)
    return shards


def _encode_into_cache(texts: list[Path], given: list[Path], target: Path, tokenizer: WordPieceTokenizer,
                       segmenter: str | None, again: bool) -> None:
    """Encode the texts into the cache directory `target`: continuing an encode stopped midway, or (`again`)
    replacing a damaged one; a process that finds another encoding the same text waits for it."""
    import sys

    from bertcli.data.encode import PROGRESS, encode_corpus

    partial = not again and (target / STAGE_DIR / PROGRESS).is_file()  # an encode stopped midway: continued
    sys.stderr.write(f"encoding {len(texts)} text file(s) into {target}"
                     f"{' (continuing where it stopped)' if partial else ''}\n")
    def whole(directory: Path) -> bool:  # (another process may have encoded it again meanwhile)
        try:
            load_shards(directory, tokenizer)
        except DamagedShards:
            return False
        return True

    with claim(target, "shards", resume=partial, overwrite=not partial, wait=True,
               complete_with=whole if again else "index.json", replacing="the shard cache") as mine:
        if not mine.complete:  # else another process encoded the same text meanwhile
            try:
                encode_corpus(tokenizer, texts, target, segmenter=segmenter, resume=partial, strict=False,
                              again="run it again")
            except DataError as err:  # named by the path the user gave, not the spool file read
                message = str(err)
                for text, path in zip(texts, given):
                    message = message.replace(str(text), str(path))
                raise DataError(message) from None


@contextlib.contextmanager
def spooled(paths: list[Path], scan: bool = False) -> Iterator[list[Path]]:
    """The paths, each stream among them (a FIFO, /dev/stdin, `<(...)`, a device) replaced by a cache
    file holding what it gave: read once, stopped at the first NUL byte or over-long line (a device
    such as /dev/zero is not text); with `scan`, files are read so too, and all must be UTF-8. The cache
    files are removed on the way out."""
    read_once(paths)
    made: list[tuple[Path, int]] = []  # each spooled file and the descriptor whose lock says it is in use
    try:
        out = []
        for path in paths:
            if is_stream(path):
                made.append(_spool(path, text=scan))
                out.append(made[-1][0])
            else:
                if scan and path.is_file():  # a reader that takes whole lines into memory comes next
                    try:
                        _copy_checked(path, None, text=True)
                    except OSError as err:
                        raise DataError(f"{path}: cannot read: {err.strerror}") from None
                out.append(path)
        yield out
    finally:
        for path, fd in made:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a later run sweeps it (scratch.py)
            finally:
                os.close(fd)


def _spool(path: Path, text: bool = False) -> tuple[Path, int]:
    """A cache file holding what the stream `path` gave, and its descriptor: the file stays locked
    while that is open, so that a later run's `swept` leaves it alone (scratch.py)."""
    directory = cache_dir() / "spool"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        swept(directory, ".txt")  # streams spooled by runs that were killed
        fd, target = locked_temp(directory, ".txt")  # a new file of its own, never a link
    except OSError as err:
        raise storage_error(directory, err) from None
    try:
        with os.fdopen(os.dup(fd), "wb") as sink:
            _copy_checked(path, sink, text)
    except BaseException as err:
        with contextlib.suppress(OSError):
            target.unlink(missing_ok=True)
        os.close(fd)
        if isinstance(err, OSError):
            raise storage_error(target, err) if err.errno in STORAGE_ERRORS else DataError(
                f"{path}: cannot read: {err.strerror}") from None
        raise
    return target, fd


def _copy_checked(path: Path, sink, text: bool = False) -> None:
    """Read `path` once in pieces (into `sink`, if any), stopping at the first NUL byte or at a line
    over MAX_CORPUS_LINE_BYTES; with `text`, at the first byte that is not UTF-8 too, named by its line
    and byte offset."""
    offset, since_break, carry, lines = 0, 0, b"", 1
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            if b"\x00" in chunk:
                raise DataError(f"{path}: NUL byte (byte offset {offset + chunk.index(0)}); is this a text stream?")
            last = chunk.rfind(b"\n")
            since_break = since_break + len(chunk) if last < 0 else len(chunk) - last - 1
            if since_break > MAX_CORPUS_LINE_BYTES:
                raise DataError(f"{path}: over {MAX_CORPUS_LINE_BYTES:,} bytes without a line break; is this a "
                                "text file?")
            if text:  # whole lines decoded, the last partial one carried (a character may straddle chunks)
                data = carry + chunk
                cut = data.rfind(b"\n") + 1
                decode_text(data[:cut], str(path), offset - len(carry), first_line=lines)
                lines, carry = lines + data.count(b"\n", 0, cut), data[cut:]
            if sink is not None:
                sink.write(chunk)
            offset += len(chunk)
    if text:
        decode_text(carry, str(path), offset - len(carry), first_line=lines)
