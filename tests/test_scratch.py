"""Temporary files in the cache: a killed run's are removed by a later run, a live run's never."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bertcli.data.corpus import load_shards, spooled
from bertcli.data.encode import encode_corpus
from bertcli.scratch import ABANDONED_AFTER, locked_temp, locked_temp_dir, sweep, sweep_dirs
from bertcli.tokenizer import load_tokenizer

OLD = time.time() - ABANDONED_AFTER - 60


def _age(path, when=OLD):
    os.utime(path, (when, when), follow_symlinks=False)


@contextlib.contextmanager
def _writer(make: str, directory: Path):
    """Another process that runs `make` (which sets p to the path it made, holding its lock) and waits; SIGKILLed
    at the end of the block, as a run or an export killed midway."""
    writer = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from pathlib import Path; from bertcli "
                               f"import scratch; d = Path(sys.argv[1]); {make}; print(p, flush=True); time.sleep(60)",
                               str(directory)], stdout=subprocess.PIPE, text=True)
    try:
        yield Path(writer.stdout.readline().strip())
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


def test_the_file_of_a_killed_writer_is_removed_and_a_live_writers_kept(tmp_path):
    with _writer("fd, p = scratch.locked_temp(d, '.tmp'); os.write(fd, b'x' * 1000)", tmp_path) as killed:
        _age(killed)
        assert sweep(tmp_path, ".tmp") == []  # its writer lives and holds the lock, however old the file
        assert killed.exists()
    fd, live = locked_temp(tmp_path, ".tmp")  # this process's own, still open
    _age(live)
    assert sweep(tmp_path, ".tmp") == [(killed, 1000)]
    assert not killed.exists() and live.exists()
    os.close(fd)


def test_only_old_plain_files_named_as_bertcli_names_them_on_this_host_are_touched(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("the user's")
    cache = tmp_path / "cache"
    cache.mkdir()
    fd, recent = locked_temp(cache, ".tmp")
    os.close(fd)  # its writer is gone, but it was written a moment ago (a writer between mkstemp and flock)
    mine = recent.name[:-len("xxxxxxxx.tmp")]  # bertcli-HOST-
    (cache / f"{mine}abcd1234.tmp").symlink_to(outside)
    os.mkfifo(cache / f"{mine}fifo0000.tmp")  # would block an open(): never opened
    os.link(outside, cache / f"{mine}link0000.tmp")  # the user's file under a second name
    for name in ["notes.tmp", f"{mine}abcd1234.txt", f"{mine}ab.tmp", f"x-{mine}abcd1234.tmp",
                 "tmpabcd1234.tmp",  # a bertcli from before the lock named its files so: not provably abandoned
                 "bertcli-otherhost-abcd1234.tmp"]:  # another host's: its lock may not be visible here
        (cache / name).write_text("not ours")
    for path in cache.iterdir():
        _age(path)
    _age(recent, time.time())
    (cache / f"{mine}abcd5678.tmp").mkdir()
    assert sweep(cache, ".tmp") == []
    assert outside.read_text() == "the user's"
    assert len(list(cache.iterdir())) == 11


def test_the_folder_of_a_killed_export_is_removed_and_nothing_else(tmp_path):
    """export --int8 quantizes in a private folder of the temporary directory; a SIGKILL leaves it (the copies of
    the graph, hundreds of MB). A later export removes it: unlocked, old, and holding only the graph names."""
    names = {"model.onnx", "model.int8.onnx", "model-inferred.onnx"}
    with _writer("fd, p = scratch.locked_temp_dir(d, 'export'); (p / 'model.onnx').write_bytes(b'x' * 1000)",
                 tmp_path) as killed:
        _age(killed / "model.onnx")
        _age(killed)
        assert sweep_dirs(tmp_path, "export", names) == []  # its writer lives and holds the lock
    prefix = killed.name[:-len("xxxxxxxx")]  # bertcli-HOST-export.
    kept = []
    for name, files in [("extra000", {"model.onnx": b"x", "notes.txt": b"the user's"}),
                        ("fresh000", {"model.onnx": b"x"}),
                        ("linked00", {}), ("dirin000", {}), ("hardln00", {})]:
        folder = tmp_path / (prefix + name)
        folder.mkdir()
        for file, data in files.items():
            (folder / file).write_bytes(data)
            _age(folder / file, OLD if name != "fresh000" else time.time())
        kept.append(folder)
    (tmp_path / (prefix + "linked00") / "model.onnx").symlink_to(tmp_path / "outside")  # a link, even named so
    (tmp_path / (prefix + "dirin000") / "model.onnx").mkdir()
    (tmp_path / "yours").write_bytes(b"x")
    os.link(tmp_path / "yours", tmp_path / (prefix + "hardln00") / "model.onnx")  # a second name of a file of yours
    _age(tmp_path / "yours")
    (tmp_path / (prefix + "aslink00")).symlink_to(kept[0])
    fd, live = locked_temp_dir(tmp_path, "export")  # this process's, still locked
    for folder in [*kept, live]:
        _age(folder)
    assert sweep_dirs(tmp_path, "export", names) == [(killed, 1000)]
    assert not killed.exists() and live.is_dir() and all(folder.exists() for folder in kept)
    assert (kept[0] / "notes.txt").read_bytes() == b"the user's"
    os.close(fd)
    assert (live, 0) in sweep_dirs(tmp_path, "export", names, older_than=0)  # unlocked now: its writer is done


def test_packing_removes_a_killed_packing_runs_partial_file(tiny_tokenizer_dir, tmp_path, monkeypatch, capfd):
    from bertcli.data import sequences

    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sequences, "CACHE_TOKENS", 0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {d} opens here.\nIts second sentence follows.\nA third ends it." for d in range(40)))
    encode_corpus(load_tokenizer(tiny_tokenizer_dir), [text], tmp_path / "s", show_progress=False)
    shards = load_shards(tmp_path / "s")
    (tmp_path / "cache" / "sequences").mkdir(parents=True)
    fd, partial = locked_temp(tmp_path / "cache" / "sequences", ".tmp")
    os.write(fd, b"\0" * 56 * 3)
    os.close(fd)  # as the kernel closes it when its process is killed
    _age(partial)
    capfd.readouterr()
    made = sequences.sequences(shards, 48, "nsp", 0.1, seed=3)
    assert "removed 1 temporary file(s)" in capfd.readouterr().err
    assert not partial.exists()
    assert isinstance(made, np.memmap) and [p.suffix for p in partial.parent.iterdir()] == [".bin"]


def test_a_spooled_stream_is_locked_while_in_use_and_a_killed_runs_is_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTCLI_CACHE", str(tmp_path / "cache"))
    fifo = tmp_path / "fifo"
    spool = tmp_path / "cache" / "spool"
    spool.mkdir(parents=True)
    fd, abandoned = locked_temp(spool, ".txt")
    os.close(fd)
    _age(abandoned)
    for _ in range(2):
        os.mkfifo(fifo)
        feeder = subprocess.Popen(["sh", "-c", f"printf 'some text\\n' > {fifo}"])
        with spooled([fifo]) as (copy,):
            assert copy.read_text() == "some text\n" and not abandoned.exists()
            _age(copy)
            assert sweep(spool, ".txt") == []  # in use: locked
        feeder.wait()
        fifo.unlink()
        assert not copy.exists()
