"""Pretraining sequences packed from a corpus's shards, Google's create_pretraining_data.py algorithm,
as an (N, 7) int64 array of token ranges (no token is copied).

A large corpus's array is written once into the cache, a shard at a time, and memory-mapped from then
on: the same shards, window, objective and seed start a run without a pass over the corpus, and
building it holds a shard's rows at a time, not the whole. Shards pack independently, on all cores.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import random
import sys
from array import array
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from bertcli.data.corpus import Shard, cache_dir
from bertcli.errors import DataError
from bertcli.fileio import FILE_MODE
from bertcli.scratch import locked_temp, swept

# an instance: shard and [start, end) of segment A, shard and [start, end) of B (empty when none), label
A_SHARD, A_START, A_END, B_SHARD, B_START, B_END, LABEL = range(7)
CACHE_TOKENS = 1_000_000  # corpora with more tokens keep their sequences in the cache
VERSION = 4  # of the algorithm: a change of what it makes changes the cache key (2: a generator per shard;
# 4: long sentences cut into pieces of the window, or of half of it for pairs)


def sequences(shards: Sequence[Shard], max_seq_len: int, objective: str, short_seq_prob: float,
              seed: int) -> np.ndarray:
    """make_instances' array: for a corpus of more than CACHE_TOKENS tokens, memory-mapped from the cache
    (made there on first use); for a smaller one, made in memory (it takes well under a second)."""
    if sum(len(s.tokens) for s in shards) <= CACHE_TOKENS or not all(s.identity for s in shards):
        return make_instances(shards, max_seq_len, objective, short_seq_prob, seed)
    key = hashlib.sha256(json.dumps([VERSION, [s.identity for s in shards], max_seq_len, objective, short_seq_prob,
                                     seed]).encode()).hexdigest()[:32]
    path = cache_dir() / "sequences" / f"{key}.bin"
    if path.is_symlink() or (path.exists() and not path.is_file()):  # not bertcli's: left alone, nothing cached
        return make_instances(shards, max_seq_len, objective, short_seq_prob, seed)
    if path.is_file():
        rows = _cached(path, shards)
        if rows is not None:
            return rows
        sys.stderr.write(f"{path}: not whole, or not sequences of these shards (damaged or edited?): packed again\n")
    sys.stderr.write(f"packing {sum(len(s.tokens) for s in shards):,} tokens into sequences of up to {max_seq_len} "
                     f"(once: kept in {path.parent})\n")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        swept(path.parent, ".tmp")  # partial files of packing runs that were killed
        fd, name = locked_temp(path.parent, ".tmp")
    except OSError:
        return make_instances(shards, max_seq_len, objective, short_seq_prob, seed)  # no cache: in memory
    try:
        with os.fdopen(fd, "wb") as sink:
            make_instances(shards, max_seq_len, objective, short_seq_prob, seed, sink=sink, workers=packing_workers())
            sink.write(np.asarray([TRAILER, sink.tell() // ROW_BYTES, 0, 0, 0, 0, 0], dtype=np.int64).tobytes())
            os.fchmod(sink.fileno(), FILE_MODE)  # a file kept for later runs: the user's umask, not a temporary's
            sink.flush()
            os.fsync(sink.fileno())
            os.replace(name, path)  # locked until renamed; another process making the same file wrote the same bytes
    except OSError:
        Path(name).unlink(missing_ok=True)
        return make_instances(shards, max_seq_len, objective, short_seq_prob, seed)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return np.memmap(path, dtype=np.int64, mode="r").reshape(-1, 7)[:-1]


ROW_BYTES = 7 * 8
TRAILER = int.from_bytes(b"bertcli\x03", "little")  # the last row of a cache file: this, and how many rows precede


def _cached(path: Path, shards: Sequence[Shard]) -> np.ndarray | None:
    """The sequences of a cache file written whole (its trailer counts its rows) whose every row points
    into these shards, or None: a file cut short or edited is packed again rather than trained on, and a
    range beyond a shard would end the run in an IndexError."""
    try:
        rows = np.memmap(path, dtype=np.int64, mode="r")
    except (OSError, ValueError):  # (an empty file cannot be mapped)
        return None
    if len(rows) % 7 or len(rows) < 14:
        return None
    rows = rows.reshape(-1, 7)
    body = rows[:-1]
    if rows[-1, 0] != TRAILER or rows[-1, 1] != len(body):
        return None
    sizes = np.asarray([len(s.tokens) for s in shards], dtype=np.int64)
    for start in range(0, len(body), 1 << 20):  # a million rows at a time: the checks' arrays stay small
        part = np.asarray(body[start:start + (1 << 20)])
        a, b = part[:, A_SHARD], part[:, B_SHARD]
        if not (((a >= 0) & (a < len(sizes)) & (b >= 0) & (b < len(sizes))).all()):
            return None
        fits = ((0 <= part[:, A_START]) & (part[:, A_START] < part[:, A_END]) & (part[:, A_END] <= sizes[a])
                & (0 <= part[:, B_START]) & (part[:, B_START] <= part[:, B_END]) & (part[:, B_END] <= sizes[b])
                & ((part[:, LABEL] == 0) | (part[:, LABEL] == 1)))
        if not fits.all():
            return None
    return body


def make_instances(shards: Sequence[Shard], max_seq_len: int, objective: str, short_seq_prob: float,
                   seed: int, sink: BinaryIO | None = None, workers: int = 1) -> np.ndarray | None:
    """(N, 7) int64 array of instances; Google's algorithm over each document, shard by shard. With `sink`,
    the rows are written there a shard at a time instead (and None returned).

    Each shard draws from its own generator (the run's seed for the first, so a one-shard corpus packs
    as before; the seed and the shard's number for the others), so shards pack independently: with
    `workers` > 1 they are packed by that many forked processes, and the rows are the same as one
    process makes. A random next sentence (NSP) still comes from any document of the corpus."""
    per_shard = [len(shard.documents) - 1 for shard in shards]
    if not sum(per_shard):
        raise DataError("the pretraining corpus has no documents")
    global _JOB
    pair = objective != "none"
    piece = (max_seq_len - 2) // 2 if pair else max_seq_len - 2  # two pieces fill a pair's window: A and B
    offsets = [_cut_long(s.sentences, s.documents, max(1, piece)) for s in shards]
    _JOB = (offsets, per_shard, max_seq_len, objective, short_seq_prob, seed)
    pieces, total = [], 0
    try:
        for rows in _each_shard(len(shards), workers):
            total += len(rows)
            if sink is not None:
                sink.write(rows)
            else:
                pieces.append(rows)
    finally:
        _JOB = None
    if not total:
        raise DataError("the pretraining corpus yields no sequences (is it empty?)")
    if sink is not None:
        return None
    return np.frombuffer(b"".join(pieces), dtype=np.int64).reshape(-1, 7).copy()


_JOB: tuple | None = None  # what the shard packers read: set by make_instances, inherited by forked workers


def _each_shard(count: int, workers: int):
    """Each shard's rows (bytes), in shard order; by `workers` forked processes where there are several."""
    import multiprocessing

    if workers > 1 and count > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(min(workers, count), initializer=_worker_start) as pool:
            yield from pool.imap(_pack_shard, range(count))
    else:
        for s in range(count):
            yield _pack_shard(s)


def _worker_start() -> None:
    """A packing worker leaves Ctrl-C to its parent, which ends the pool, and dies with the parent
    (Linux): killed by SIGTERM or SIGKILL, it would otherwise pack on and end in a broken pipe."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


def _pack_shard(s: int) -> bytes:
    """The rows of shard `s`'s documents, as int64 bytes."""
    offsets, per_shard, max_seq_len, objective, short_seq_prob, seed = _JOB
    rng = random.Random(seed if s == 0 else f"{seed}:{s}")
    docs = _Documents(per_shard)
    pair = objective != "none"
    max_tokens = max_seq_len - (3 if pair else 2)
    out = array("q")
    doc_number = docs.base[s]
    starts, bounds = (_Window(a) for a in offsets[s])
    for d in range(per_shard[s]):
        first, last = bounds[d], bounds[d + 1]  # sentence range
        target = max_tokens
        if rng.random() < short_seq_prob:
            target = rng.randint(2, max_tokens)
        chunk_begin, length, i = first, 0, first
        while i < last:
            length += starts[i + 1] - starts[i]
            if i == last - 1 or length >= target:
                chunk_end = i + 1  # sentences [chunk_begin, chunk_end)
                if not pair:
                    a = (starts[chunk_begin], starts[chunk_end])
                    if a[1] > a[0]:
                        out.extend((s, a[0], min(a[1], a[0] + max_tokens), s, 0, 0, 0))
                else:
                    i = _pair(out, rng, offsets, starts, docs, doc_number, s, chunk_begin, chunk_end, target,
                              max_tokens, objective, i)
                chunk_begin, length = i + 1, 0
                target = max_tokens if rng.random() >= short_seq_prob else rng.randint(2, max_tokens)
            i += 1
        doc_number += 1
    return out.tobytes()


def _cut_long(sentences: np.ndarray, documents: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's sentence offsets with each sentence of more than `size` tokens cut into pieces of `size`
    (the last shorter), and its document offsets into those. Google's algorithm takes a sentence whole and
    truncates a sequence to the window, which assumes short sentences: a paragraph without end marks (.!?)
    read as one sentence would give one sequence and lose the rest. (Offsets of any integer type, as shards
    of other tools may hold them, are computed as int64.)"""
    sentences = np.asarray(sentences, dtype=np.int64)
    documents = np.asarray(documents, dtype=np.int64)
    lengths = np.diff(sentences)
    pieces = np.maximum(lengths - 1, 0) // size + 1
    if (pieces == 1).all():
        return sentences, documents
    first = np.cumsum(pieces) - pieces  # each sentence's first piece
    within = np.arange(int(pieces.sum())) - np.repeat(first, pieces)
    cut = np.append(np.repeat(np.asarray(sentences[:-1]), pieces) + within * size, sentences[-1])
    return cut, np.append(first, pieces.sum())[documents]


def packing_workers() -> int:
    """Processes to pack with: this machine's cores, shared among the training processes started on it
    (torchrun's LOCAL_WORLD_SIZE), each of which packs its own copy."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    return max(1, cores // (int(local) if local.isdigit() and int(local) > 0 else 1))


class _Window:
    """Offsets read a million at a time as Python ints (a shard's may be memory-mapped and of any length;
    one numpy scalar per sentence would cost more than the algorithm itself)."""

    SIZE = 1 << 20

    def __init__(self, offsets: np.ndarray):
        self.offsets, self.lo, self.values = offsets, 0, []

    def __getitem__(self, i: int) -> int:
        if not 0 <= i - self.lo < len(self.values):
            self.lo = i
            self.values = self.offsets[i:i + self.SIZE].tolist()
        return self.values[i - self.lo]


class _Documents:
    """Document numbers across shards -> (shard, document), without a Python object per document."""

    def __init__(self, per_shard: list[int]):
        self.base = [0]
        for count in per_shard:
            self.base.append(self.base[-1] + count)
        self.count = self.base[-1]

    def __getitem__(self, number: int) -> tuple[int, int]:
        s = bisect.bisect_right(self.base, number) - 1
        return s, number - self.base[s]

    def __len__(self) -> int:
        return self.count


def _pair(out, rng, offsets, starts, docs, doc_number, s, begin, end, target, max_tokens, objective, i) -> int:
    """Split sentences [begin, end) of shard `s` (`starts`: its offsets) into A and B (or A and a random B
    for NSP, from `offsets`: each shard's sentence and document offsets); returns the sentence index to
    continue from (unused sentences go back to the document)."""
    count = end - begin
    a_split = begin + (rng.randint(1, count - 1) if count >= 2 else 1)
    a = [starts[begin], starts[a_split]]
    label = 0
    if objective == "nsp" and (count == 1 or rng.random() < 0.5):
        label = 1  # B is a random segment from another document
        b_target = max(1, target - (a[1] - a[0]))
        for _ in range(10):
            other = rng.randrange(len(docs))
            if other != doc_number or len(docs) == 1:
                break
        bs, bd = docs[other]
        other_starts, other_docs = offsets[bs]
        o_first, o_last = int(other_docs[bd]), int(other_docs[bd + 1])
        j = rng.randint(o_first, o_last - 1)
        base, offsets = j, other_starts[j:min(o_last, j + 64) + 1].tolist()  # one read, not one per sentence
        b = [offsets[0], offsets[0]]
        while j < o_last and b[1] - b[0] < b_target:
            if j + 1 - base >= len(offsets):
                offsets = other_starts[base:min(o_last, base + 2 * len(offsets)) + 1].tolist()
            b[1] = offsets[j + 1 - base]
            j += 1
        i -= end - a_split  # the sentences not used as A go back into the document
    else:
        bs = s
        if count >= 2:
            b = [a[1], starts[end]]
        else:  # one long sentence: split its tokens
            whole = [starts[begin], starts[end]]
            if whole[1] - whole[0] < 2:
                return i
            cut = rng.randint(whole[0] + 1, whole[1] - 1)
            a, b = [whole[0], cut], [cut, whole[1]]
        if objective == "sop" and rng.random() < 0.5:
            a, b, s, bs, label = b, a, bs, s, 1  # swapped order
    while (a[1] - a[0]) + (b[1] - b[0]) > max_tokens:  # truncate the longer side, front or back at random
        side = a if a[1] - a[0] > b[1] - b[0] else b
        if rng.random() < 0.5:
            side[0] += 1
        else:
            side[1] -= 1
    if a[1] > a[0] and b[1] > b[0]:
        out.extend((s, a[0], a[1], bs, b[0], b[1], label))
    return i
