"""`tokenize encode` at scale: text read in blocks and cut into shards at document boundaries (the same
tokens, sentences and documents as one shard), every byte error named by its line, and an encode
stopped midway (SIGKILL, SIGTERM) continued with --resume from its last finished shard."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bertcli.data import encode
from bertcli.data.corpus import load_shards
from bertcli.data.sequences import _pack_shard
from bertcli.data.encode import encode_corpus
from bertcli.errors import BertcliError, DataError
from bertcli.tokenizer import load_tokenizer
from conftest import CORPUS, ROOT

SMALL = {"SHARD_TEXT_BYTES": 3000, "READ_BYTES": 700}  # many shards and blocks out of a few kB


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """60 documents of varied length; blank lines with spaces and a paragraph of one long line among them."""
    lines = CORPUS.strip().split("\n")
    docs = []
    for n in range(60):
        body = lines[: 1 + n % len(lines)]
        docs.append(("Chapter %d begins. " % n) + (" ".join(body) if n % 7 == 0 else "\n".join(body)))
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_bytes(("\ufeff" + "\n\n".join(docs[:30]) + "\n  \t\n" + "\n\n\n".join(docs[30:])).encode("utf-8"))
    return path


def _flat(directory):
    """The corpus as the shards hold it, whatever their number: token ids, sentence lengths, sentences per document."""
    shards = load_shards(directory)
    return (np.concatenate([np.asarray(s.tokens) for s in shards]).tolist(),
            np.concatenate([np.diff(s.sentences) for s in shards]).tolist(),
            np.concatenate([np.diff(s.documents) for s in shards]).tolist())


def test_a_large_text_is_cut_into_shards_at_document_boundaries(text, tiny_tokenizer_dir, tmp_path, monkeypatch):
    tok = load_tokenizer(tiny_tokenizer_dir)
    whole = encode_corpus(tok, [text], tmp_path / "one", show_progress=False)
    assert len(whole["shards"]) == 1 and whole["documents"] == 60
    for name, value in SMALL.items():
        monkeypatch.setattr(encode, name, value)
    cut = encode_corpus(tok, [text, text], tmp_path / "many", show_progress=False)
    shards = cut["shards"]
    assert len(shards) >= 8 and cut["documents"] == 120 and cut["tokens"] == 2 * whole["tokens"]
    size = text.stat().st_size
    for number in (0, 1):  # each file's shards cover it from the first byte, in order, each range hashed
        ranges = [s["bytes"] for s in shards if s["file"] == number]
        assert ranges[0][0] == 0 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and ranges[-1][1] <= size
        data = text.read_bytes()
        assert all(s["sha256"] == hashlib.sha256(data[slice(*s["bytes"])]).hexdigest() for s in shards)
        assert cut["sources"][number]["sha256"] == hashlib.sha256(data).hexdigest()
    assert all(0 < s["bytes"][1] - s["bytes"][0] < SMALL["SHARD_TEXT_BYTES"] + SMALL["READ_BYTES"] * 3 for s in shards)
    tokens, sentences, documents = _flat(tmp_path / "many")
    one = _flat(tmp_path / "one")
    assert (tokens, sentences, documents) == (one[0] * 2, one[1] * 2, one[2] * 2)  # no document was split
    first = tok.encode("Chapter 0 begins.", add_special_tokens=False).ids  # the byte-order mark is not text
    assert tokens[:len(first)] == first


@pytest.mark.parametrize("data, message", [
    (b"fine\n" * 500 + b"caf\xe9\n", "line 501: not UTF-8 text (byte offset 2503)"),
    (b"fine\n\n" * 300 + b"a\x00b\n", "line 601: NUL byte (byte offset 1801)"),
    (b"\n \n\n", "no text to encode"),
])
def test_a_bad_byte_is_named_by_its_line_in_any_block(data, message, tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "READ_BYTES", 700)
    (tmp_path / "bad.txt").write_bytes(data)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_corpus(load_tokenizer(tiny_tokenizer_dir), [tmp_path / "bad.txt"], tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out" / ".saving").exists()  # nothing finished: nothing kept


def test_a_line_over_the_limit_is_refused_without_holding_it(tiny_tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(encode, "MAX_CORPUS_LINE_BYTES", 5000)
    monkeypatch.setattr(encode, "READ_BYTES", 700)
    (tmp_path / "long.txt").write_bytes(b"short line\n" * 3 + b"x" * 6000 + b"\n")
    with pytest.raises(DataError, match=r"long.txt: line 4: over 5,000 bytes without a line break"):
        encode_corpus(load_tokenizer(tiny_tokenizer_dir), [tmp_path / "long.txt"], tmp_path / "out", show_progress=False)


# `bertcli tokenize encode` with small shards, and a stop after its second shard is recorded
STOPPING = """
import os, signal, sys
from bertcli.data import encode
encode.SHARD_TEXT_BYTES, encode.READ_BYTES = 3000, 700
stop = os.environ.get("STOP_WITH")
if stop:
    finish, done = encode._ShardWriter.finish, []
    def finish_then_stop(self, *args):
        done.append(1)
        if len(done) == int(os.environ.get("STOP_AT", "3")):  # by default: two shards recorded, a third half written
            os.kill(os.getpid(), getattr(signal, stop))
        return finish(self, *args)
    encode._ShardWriter.finish = finish_then_stop
sys.argv = ["bertcli", *sys.argv[1:]]
from bertcli.cli import main
main()
"""


def _encode(tokenizer, text, out, *extra, stop=None, stop_at=3):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STOP_AT": str(stop_at), **({"STOP_WITH": stop} if stop else {})}
    texts = [text] if not isinstance(text, list) else text
    return subprocess.run([sys.executable, "-c", STOPPING, "tokenize", "encode", "--tokenizer", str(tokenizer),
                           *(a for t in texts for a in ("--corpus", str(t))), "--out", str(out), *extra],
                          capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize("stop, code", [("SIGKILL", -9), ("SIGTERM", 143), ("SIGINT", 130)])
def test_a_stopped_encode_continues_with_resume_from_its_last_shard(stop, code, text, tiny_tokenizer_dir, tmp_path,
                                                                   monkeypatch):
    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [text], tmp_path / "whole", show_progress=False)
    with monkeypatch.context() as small:
        for name, value in SMALL.items():
            small.setattr(encode, name, value)
        straight = encode_corpus(tok, [text], tmp_path / "straight", show_progress=False)  # never stopped
    out = tmp_path / "out"
    stopped = _encode(tiny_tokenizer_dir, text, out, stop=stop)
    assert stopped.returncode == code, stopped.stderr.decode()
    if stop != "SIGKILL":
        assert f"stopped by {'SIGTERM' if stop == 'SIGTERM' else 'Ctrl-C'}; 2 shard(s)" in stopped.stderr.decode()
        assert "with --resume to continue" in stopped.stderr.decode() and b"Traceback" not in stopped.stderr
    stage = out / ".saving"
    assert [r["name"] for r in json.loads((stage / "progress.json").read_text())["shards"]] == ["00000", "00001"]
    inode = (stage / "00000.tokens.bin").stat().st_ino
    again = _encode(tiny_tokenizer_dir, text, out)
    assert again.returncode == 2 and b"pass --resume to continue it" in again.stderr
    resumed = _encode(tiny_tokenizer_dir, text, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert (out / "00000.tokens.bin").stat().st_ino == inode  # kept, not encoded again
    assert not stage.exists() and not (out / "progress.json").exists()
    assert _flat(out) == _flat(tmp_path / "whole")
    index = json.loads((out / "index.json").read_text())
    assert index["shards"] == straight["shards"]  # cut where the encode that was never stopped cut: the same shards
    assert all((out / n).read_bytes() == (tmp_path / "straight" / n).read_bytes() for n in os.listdir(out) if n[0] == "0")
    assert index["sources"][0]["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    finished = _encode(tiny_tokenizer_dir, text, out, "--resume")
    assert finished.returncode == 2 and b"nothing to resume: its encode finished" in finished.stderr


def test_resume_refuses_text_that_changed_and_keeps_what_it_had(text, tiny_tokenizer_dir, tmp_path, cli):
    changed = tmp_path / "corpus.txt"
    changed.write_bytes(text.read_bytes())
    out = tmp_path / "out"
    assert _encode(tiny_tokenizer_dir, changed, out, stop="SIGKILL").returncode == -9
    data = bytearray(changed.read_bytes())
    data[100] = ord("Z") if data[100] != ord("Z") else ord("Y")  # inside the first shard's text
    changed.write_bytes(bytes(data))
    finished = {p.name: p.read_bytes() for p in (out / ".saving").iterdir() if not p.name.startswith("00002")}
    refused = _encode(tiny_tokenizer_dir, changed, out, "--resume")
    assert refused.returncode == 2 and b"bytes 0-" in refused.stderr and b"the file changed" in refused.stderr
    assert {p.name: p.read_bytes() for p in (out / ".saving").iterdir()} == finished  # (the half-written third: gone)
    other = cli("tokenize", "encode", "--tokenizer", str(tiny_tokenizer_dir), "--corpus", str(text), "--out",
                str(out), "--resume", "--segmenter", "none")
    assert other.returncode == 0, other.stderr.decode()  # the original text continues where it stopped


@pytest.mark.parametrize("damaged", [False, True], ids=["continued", "record-damaged"])
def test_the_shard_cache_of_a_recipes_text_continues_where_it_stopped(damaged, text, tiny_tokenizer_dir, tmp_path,
                                                                      monkeypatch, capfd):
    """bertcli's own cache continues a stopped encode; one whose record it cannot use (damaged, or of another
    version) it encodes afresh rather than refusing every run."""
    from bertcli.data.corpus import shards_for
    from bertcli.errors import Interrupted

    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(tiny_tokenizer_dir)
    for name, value in SMALL.items():
        monkeypatch.setattr(encode, name, value)
    finish, calls = encode._ShardWriter.finish, []

    def finish_then_stop(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return finish(self, *args)

    monkeypatch.setattr(encode._ShardWriter, "finish", finish_then_stop)
    with pytest.raises(Interrupted, match="2 shard"):
        shards_for([str(text)], tok)
    monkeypatch.setattr(encode._ShardWriter, "finish", finish)
    if damaged:
        (progress,) = (tmp_path / "cache").glob("shards/*/.saving/progress.json")
        progress.write_text("{")
    capfd.readouterr()
    continued = shards_for([str(text)], tok)
    assert "continuing where it stopped" in capfd.readouterr().err
    encode_corpus(tok, [text], tmp_path / "whole", show_progress=False)
    assert np.concatenate([np.asarray(s.tokens) for s in continued]).tolist() == _flat(tmp_path / "whole")[0]


def test_a_large_corpus_packs_its_sequences_once_into_the_cache(text, tiny_tokenizer_dir, tmp_path, monkeypatch):
    from bertcli.data import sequences

    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sequences, "CACHE_TOKENS", 0)
    encode_corpus(load_tokenizer(tiny_tokenizer_dir), [text], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s")
    made = sequences.sequences(shards, 48, "nsp", 0.1, seed=3)
    (cached,) = (tmp_path / "cache" / "sequences").iterdir()
    assert isinstance(made, np.memmap) and (made == sequences.make_instances(shards, 48, "nsp", 0.1, seed=3)).all()
    monkeypatch.setattr(sequences, "make_instances", lambda *a, **k: pytest.fail("packed again"))
    again = sequences.sequences(load_shards(tmp_path / "s"), 48, "nsp", 0.1, seed=3)
    assert (again == made).all() and len(list(cached.parent.iterdir())) == 1
    monkeypatch.undo()
    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sequences, "CACHE_TOKENS", 0)
    sequences.sequences(shards, 48, "nsp", 0.1, seed=4)  # another seed, another window: their own files
    sequences.sequences(shards, 64, "nsp", 0.1, seed=3)
    assert len(list(cached.parent.iterdir())) == 3
    assert cached.stat().st_mode & 0o777 == 0o666 & ~_umask()  # kept for later runs: written as the user's files
    expected, whole = np.array(made), cached.read_bytes()
    del made, again  # (a file mapped in memory and then cut short ends the process in a bus error)
    beyond = np.frombuffer(whole, dtype=np.int64).copy()
    beyond[sequences.A_END] = len(shards[0].tokens) + 1  # the first row ends past its shard: an IndexError
    for spoilt in (whole[:5 * 56], whole[:-56], beyond.tobytes(), b"", whole[:-1]):  # cut short, or edited
        cached.write_bytes(spoilt)
        again = np.array(sequences.sequences(load_shards(tmp_path / "s"), 48, "nsp", 0.1, seed=3))
        assert (again == expected).all() and cached.read_bytes() == whole  # packed again


@pytest.mark.parametrize("grown", [0, 1], ids=["finished-file", "file-being-read"])
def test_resume_refuses_a_file_that_grew_after_it_was_read_to_its_end(grown, text, tiny_tokenizer_dir, tmp_path):
    """A file read to its end and then appended to would have its new text run into its last document (or
    be encoded after the next file): refused, like any other change."""
    files = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for f in files:
        f.write_bytes(text.read_bytes())
    out = tmp_path / "out"
    first = len(json.loads(_encode(tiny_tokenizer_dir, files[0], tmp_path / "count").returncode == 0 and
                           (tmp_path / "count" / "index.json").read_text())["shards"])
    assert _encode(tiny_tokenizer_dir, files, out, stop="SIGKILL", stop_at=first + 2).returncode == -9
    progress = json.loads((out / ".saving" / "progress.json").read_text())
    assert len(progress["files"]) == 1 and progress["shards"][first - 1]["eof"]
    if grown:  # killed after a.txt's last shard was recorded, before a.txt was: its last shard says it ended there
        progress["files"], progress["shards"] = [], progress["shards"][:first]
        (out / ".saving" / "progress.json").write_text(json.dumps(progress))
    with open(files[0], "ab") as f:
        f.write(b"more words at the end.\n")
    refused = _encode(tiny_tokenizer_dir, files, out, "--resume")
    assert refused.returncode == 2 and b"a.txt" in refused.stderr and b"the file changed" in refused.stderr


def test_text_without_blank_lines_is_split_into_documents_and_shards(tiny_tokenizer_dir, tmp_path, monkeypatch, capfd):
    for name, value in {**SMALL, "DOCUMENT_CHARS": 2000}.items():
        monkeypatch.setattr(encode, name, value)
    lines = CORPUS.strip().split("\n")
    (tmp_path / "flat.txt").write_text("\n".join(lines[i % len(lines)] for i in range(400)) + "\n", encoding="utf-8")
    index = encode_corpus(load_tokenizer(tiny_tokenizer_dir), [tmp_path / "flat.txt"], tmp_path / "out",
                          show_progress=False)
    assert index["documents"] > 5 and len(index["shards"]) > 2
    assert "document(s) ran over 2,000 characters without a blank line and were split" in capfd.readouterr().err
    (tmp_path / "one.txt").write_text(" ".join(lines * 20) + "\n", encoding="utf-8")  # one long line, then the end
    index = encode_corpus(load_tokenizer(tiny_tokenizer_dir), [tmp_path / "one.txt"], tmp_path / "one",
                          show_progress=False)
    assert index["documents"] == 1 and "were split" not in capfd.readouterr().err  # it ended there: nothing split


def test_a_damaged_shard_cache_is_encoded_again_and_a_foreign_file_in_it_kept(text, tiny_tokenizer_dir, tmp_path,
                                                                             monkeypatch, capfd):
    """A shard of bertcli's cache cut short (a disk, a hand) would stop every later run on the same text: it is
    encoded again, once; a file bertcli did not write there is never removed for it."""
    from bertcli.data.corpus import shards_for

    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    tok = load_tokenizer(tiny_tokenizer_dir)
    first = [np.asarray(s.tokens).tolist() for s in shards_for([str(text)], tok)]
    (cached,) = (tmp_path / "cache").glob("shards/*/00000.tokens.bin")
    with open(cached, "r+b") as f:
        f.truncate(100)
    capfd.readouterr()
    assert [np.asarray(s.tokens).tolist() for s in shards_for([str(text)], tok)] == first
    assert "in bertcli's shard cache: its text is encoded again" in capfd.readouterr().err
    index = (cached.parent / "index.json").stat().st_ino
    from bertcli.data.corpus import _encode_into_cache

    _encode_into_cache([text], [text], cached.parent, tok, None, again=True)  # mended meanwhile: kept as it is
    assert (cached.parent / "index.json").stat().st_ino == index
    with monkeypatch.context() as busy:  # a shard that cannot be read now is not damaged: nothing encoded again
        busy.setattr(np, "memmap", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EMFILE, "Too many open files")))
        with pytest.raises(DataError, match="cannot read the shard \\(Too many open files\\)"):
            shards_for([str(text)], tok)
    assert (cached.parent / "index.json").stat().st_ino == index
    with open(cached, "r+b") as f:
        f.truncate(100)
    (cached.parent / "notes.txt").write_text("mine")
    with pytest.raises(BertcliError, match="notes.txt"):
        shards_for([str(text)], tok)
    assert (cached.parent / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("kind", ["documents", "text-without-blank-lines", "ideographic-spaces"])
def test_where_shards_and_documents_end_depends_on_the_text_not_on_the_blocks(kind, text, tiny_tokenizer_dir,
                                                                              tmp_path, monkeypatch):
    """A resumed encode reads its blocks from the last shard's end, not from where an encode that was never
    stopped read them: shards and long documents end at the same bytes whatever the blocks (a line of U+3000,
    as in Chinese novels, ends a document, and a shard only where the blocks do not matter)."""
    for name, value in {**SMALL, "DOCUMENT_CHARS": 2000}.items():
        monkeypatch.setattr(encode, name, value)
    lines = CORPUS.strip().split("\n")
    source = text if kind == "documents" else tmp_path / "other.txt"
    if kind == "text-without-blank-lines":
        source.write_text("\n".join(lines[i % len(lines)] for i in range(400)) + "\n", encoding="utf-8")
    if kind == "ideographic-spaces":
        source.write_text(text.read_text(encoding="utf-8").replace("\n\n\n", "\n\u3000\u3000\n"), encoding="utf-8")
    tok, made = load_tokenizer(tiny_tokenizer_dir), []
    for size in (300, 700, 1000):
        monkeypatch.setattr(encode, "READ_BYTES", size)
        index = encode_corpus(tok, [source], tmp_path / str(size), show_progress=False)
        made.append(([r["bytes"] for r in index["shards"]], _flat(tmp_path / str(size))))
    assert len(made[0][0]) > 2 and made[0] == made[1] == made[2]


def test_overwrite_keeps_a_users_file_named_as_bertcli_names_its_progress_record(text, tiny_tokenizer_dir, tmp_path, cli):
    out = tmp_path / "out"
    assert cli("tokenize", "encode", "--tokenizer", str(tiny_tokenizer_dir), "--corpus", str(text), "--out",
               str(out)).returncode == 0
    (out / "progress.json").write_text("mine")
    again = cli("tokenize", "encode", "--tokenizer", str(tiny_tokenizer_dir), "--corpus", str(text), "--out",
                str(out), "--overwrite")
    assert again.returncode == 2 and b"progress.json" in again.stderr and (out / "progress.json").read_text() == "mine"


def _pack_and_say_who(s: int) -> bytes:
    """sequences._pack_shard, noting which process packed shard `s`."""
    with open(os.environ["PACKERS_FILE"], "a") as f:
        f.write(f"{os.getpid()}\n")
    return _pack_shard(s)


@pytest.mark.parametrize("objective", ["nsp", "sop"])
def test_shards_pack_the_same_rows_in_parallel_as_one_by_one(text, tiny_tokenizer_dir, tmp_path, monkeypatch, objective):
    """Each shard has its own generator, so forked workers make exactly the rows one process makes, in
    shard order; a random next sentence may still come from another shard."""
    from bertcli.data import sequences

    for name, value in SMALL.items():
        monkeypatch.setattr(encode, name, value)
    encode_corpus(load_tokenizer(tiny_tokenizer_dir), [text], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s")
    assert len(shards) >= 4
    alone = sequences.make_instances(shards, 48, objective, 0.1, seed=5)
    packers = tmp_path / "packers"
    monkeypatch.setenv("PACKERS_FILE", str(packers))
    monkeypatch.setattr(sequences, "_pack_shard", _pack_and_say_who)  # forked workers inherit it
    together = sequences.make_instances(shards, 48, objective, 0.1, seed=5, workers=3)
    monkeypatch.undo()
    who = set(packers.read_text().split())
    # packed by forked workers, not by this process (how many of the three took a shard is up to the
    # scheduler: on a busy machine one worker may take them all)
    assert who and str(os.getpid()) not in who
    assert (alone == together).all()
    assert alone[:, 0].tolist() == sorted(alone[:, 0].tolist()) and set(alone[:, 0].tolist()) == set(range(len(shards)))
    if objective == "nsp":
        random_b = alone[alone[:, 6] == 1]
        assert (random_b[:, 3] != random_b[:, 0]).any()  # some random B from another shard
    other = sequences.make_instances(shards, 48, objective, 0.1, seed=6, workers=3)
    assert other.shape != alone.shape or not (other == alone).all()  # the seed matters


def test_packing_workers_share_the_cores_among_a_machines_processes(monkeypatch):
    from bertcli.data import sequences

    monkeypatch.setattr(sequences.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    for local, workers in (("1", 16), ("8", 2), ("32", 1), ("", 16), ("x", 16), ("0", 16)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert sequences.packing_workers() == workers


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_empty_bertcli_cache_is_the_default_cache_not_the_current_directory(monkeypatch):
    from bertcli.data.corpus import cache_dir

    monkeypatch.setenv("BERTCLI_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "bertcli"
    monkeypatch.setenv("BERTCLI_CACHE", "/some/where")
    assert cache_dir() == Path("/some/where")


def test_a_pipe_with_no_text_is_named_as_given_not_as_its_spool_file(tiny_tokenizer_dir, tmp_path, monkeypatch):
    import threading

    from bertcli.data.corpus import shards_for

    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    fifo = tmp_path / "empty-pipe"
    os.mkfifo(fifo)
    threading.Thread(target=lambda: open(fifo, "wb").close(), daemon=True).start()  # a writer that writes nothing
    with pytest.raises(DataError, match=rf"^{fifo}: no text to encode$"):
        shards_for([str(fifo)], load_tokenizer(tiny_tokenizer_dir))


def test_shards_of_another_tokenizer_or_of_a_vocab_txt_read_before_special_tokens_are_refused(tiny_tokenizer_dir,
                                                                                              tmp_path):
    """Shards hold ids of one tokenizer: a model of another would read them as other words. The same vocab.txt alone,
    as a bertcli before [MASK] was read whole from it, is another tokenizer too (its text [MASK] gave other ids)."""
    import shutil

    corpus = tmp_path / "c.txt"
    corpus.write_text("The fox jumps. [MASK] sleeps.\n\nA second document here.\n" * 5, encoding="utf-8")
    tok = load_tokenizer(tiny_tokenizer_dir)
    encode_corpus(tok, [corpus], tmp_path / "s", show_progress=False)
    assert len(load_shards(tmp_path / "s", tok)) == 1
    (tmp_path / "vocab").mkdir()
    shutil.copy(tiny_tokenizer_dir / "vocab.txt", tmp_path / "vocab")
    encode_corpus(load_tokenizer(tmp_path / "vocab"), [corpus], tmp_path / "v", show_progress=False)
    assert len(load_shards(tmp_path / "v", tok)) == 1  # the same pipeline from vocab.txt: the same ids
    index = json.loads((tmp_path / "v" / "index.json").read_text())
    index["tokenizer_sha256"] = "0" * 64  # as the older bertcli's tokenizer hashed
    (tmp_path / "v" / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"encoded with a different tokenizer than this model's \(or with the same "
                                        r"vocab.txt alone, by a bertcli that read \[MASK\]"):
        load_shards(tmp_path / "v", tok)
