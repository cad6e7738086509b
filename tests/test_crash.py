"""Crash safety: SIGKILL at random moments (many of them inside a checkpoint write), a full
disk, a read-only output directory, and non-finite losses. Every run must resume from its last
complete checkpoint and end exactly where an uninterrupted run ends; nothing the user had is
lost."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bertcli.errors import BertcliError
from bertcli.jobs import finetune
from bertcli.recipes import load_recipe
from bertcli.rundir import LOCK, MARKER
from conftest import CORPUS, ROOT, run_cli, write_recipe

pytestmark = pytest.mark.slow  # killed and resumed runs, full disks: seconds each

# Runs bertcli in this process after arranging to SIGKILL itself at the KILL_AT_REPLACE-th
# os.replace (the last step of every atomic write and of publishing a checkpoint): the file
# being written is first cut to half its size, as a crash in the middle of writing it would.
DRIVER = """
import os, signal, sys
n = int(os.environ.get("KILL_AT_REPLACE", "0"))
if n:
    real, calls = os.replace, [0]
    def replace(src, dst, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            if os.path.isfile(src):
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(src, dst, *a, **k)
    os.replace = replace
sys.argv = ["bertcli", *sys.argv[1:]]
from bertcli.cli import main
main()
"""

ROWS = [("the film is wonderful", "pos"), ("a dull and boring plot", "neg"), ("truly a joy to watch", "pos"),
        ("the acting falls flat", "neg"), ("clever and warm story", "pos"), ("painfully slow mess", "neg"),
        ("the ending is superb", "pos"), ("awful lazy script", "neg"), ("i hated it", "neg"), ("i loved it", "pos")]


def _env(tmp_path: Path, **extra) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "BERTCLI_CACHE": str(tmp_path / "cache"), **extra}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _training_log(run: Path) -> list[dict]:
    """The log without its wall-clock field (which differs between any two runs)."""
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in _records(run)]


def _log_lines(log: Path) -> int:
    try:
        return log.read_text().count("\n")
    except (FileNotFoundError, UnicodeDecodeError):
        return 0


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run / "model.safetensors")


def _classify_recipe(tmp_path: Path, tokenizer: Path) -> Path:
    train = tmp_path / "train.tsv"
    train.write_text("sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in ROWS), encoding="utf-8")
    return write_recipe(tmp_path / "classify.yaml", {"name": "classify"},
                        {"train": str(train), "eval": str(train), "max_seq_len": 32},
                        {"max_steps": 60, "batch_size": 4, "save_every": 3, "eval_every": 20, "lr": 3e-3},
                        tokenizer=tokenizer, model={"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                                    "intermediate_size": 64, "max_position": 64, "dropout": 0.1})


def _pretrain_recipe(tmp_path: Path, tokenizer: Path) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Document {n}. " + CORPUS.replace("\n", " ") for n in range(12)) + "\n",
                      encoding="utf-8")
    return write_recipe(tmp_path / "pretrain.yaml", {"name": "pretrain", "objective": "nsp"},
                        {"train": str(corpus), "eval": str(corpus), "max_seq_len": 48},
                        {"max_steps": 60, "batch_size": 8, "save_every": 3, "eval_every": 20, "lr": 2e-3},
                        tokenizer=tokenizer, model={"hidden_size": 32, "num_layers": 2, "num_heads": 4,
                                                    "intermediate_size": 64, "max_position": 64, "dropout": 0.1})


KILLS = 4  # each a process start (a few seconds): the suite's time on 2 cores is what bounds it


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_random_sigkills_then_resume_end_like_an_uninterrupted_run(command, tmp_path, tiny_tokenizer_dir):
    recipe = (_pretrain_recipe if command == "pretrain" else _classify_recipe)(tmp_path, tiny_tokenizer_dir)
    whole = run_cli(command, str(recipe), "--out", str(tmp_path / "whole"), timeout=300)
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]
    rng = random.Random(f"{command}-kills")
    cut, kills, in_checkpoint = tmp_path / "cut", 0, 0
    for attempt in range(40):
        flag = ["--resume"] if (cut / "resume.pt").is_file() else (["--overwrite"] if cut.exists() else [])
        env = _env(tmp_path)
        by_replace = kills < KILLS and attempt % 3 != 2
        if by_replace:  # inside a write: the 1st-40th rename of this attempt (about 15 per checkpoint)
            env["KILL_AT_REPLACE"] = str(rng.randint(1, 40))
        proc = subprocess.Popen([sys.executable, "-c", DRIVER, command, str(recipe), "--out", str(cut), *flag],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not by_replace and kills < KILLS:  # at a random moment once training has moved on 1-4 steps
            # (counted in log lines, not seconds: a fast machine must not finish the run first)
            log, target = cut / "log.jsonl", _log_lines(cut / "log.jsonl") + rng.randint(1, 4)
            deadline = time.time() + 120
            while proc.poll() is None and time.time() < deadline and _log_lines(log) < target:
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.02))
            proc.kill()
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -9, err.decode()[-2000:]
        kills += 1
        in_checkpoint += by_replace
    else:
        pytest.fail("the run never finished")
    assert kills >= KILLS and in_checkpoint >= KILLS // 2, (kills, in_checkpoint)
    assert _training_log(cut) == _training_log(tmp_path / "whole")
    ours, theirs = _weights(cut), _weights(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert json.loads((cut / "metrics.json").read_text()) == json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert sorted(p.name for p in cut.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())


def _digest(run: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(run.iterdir()) if p.is_file()}


def _checkpoint(digest: dict[str, str]) -> dict[str, str]:
    """The checkpoint's files (the log and the recipe of the run that failed may change, and the lock
    file holds the pid of the last writer)."""
    return {k: v for k, v in digest.items() if k not in ("log.jsonl", "recipe.yaml", ".bertcli.lock")}


def _leftovers(run: Path) -> list[str]:
    """Hidden files other than bertcli's marker and lock: what a failed write would leave behind."""
    return [p.name for p in run.iterdir() if p.name.startswith(".") and p.name not in (MARKER, LOCK)]


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_write_the_disk_refuses_keeps_the_previous_checkpoint(cli, tmp_path, tiny_tokenizer_dir):
    """A file-size limit (RLIMIT_FSIZE) makes every large write fail as a full disk does."""
    recipe = _classify_recipe(tmp_path, tiny_tokenizer_dir)
    run = tmp_path / "run"
    first = cli("finetune", str(recipe), "--out", str(run), "--set", "train.max_steps=6")
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    before = _digest(run)
    weights = (run / "model.safetensors").stat().st_size
    cmd = [sys.executable, "-m", "bertcli", "finetune", str(recipe), "--out", str(run), "--resume",
           "--set", "train.max_steps=12"]
    # the weights do not fit; then they do, but not resume.pt (weights and Adam's two moments), which torch writes
    for limit, why in ((weights // 2, "File too large"), (weights * 3 // 2, "writing resume.pt failed")):
        full = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, preexec_fn=_limit_file_size(limit),
                              timeout=300)
        err = full.stderr.decode()
        assert full.returncode == 2, err[-2000:]
        assert f"cannot save the checkpoint of step 9: {why}" in err and "previous checkpoint" in err, err
        assert "Traceback" not in err
        after = _digest(run)
        assert _checkpoint(after) == _checkpoint(before)
        assert not _leftovers(run)
    again = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, timeout=300)  # room again: it finishes
    assert again.returncode == 0, again.stderr.decode()[-2000:]
    assert [r["step"] for r in _records(run) if "loss" in r] == list(range(1, 13))


@pytest.fixture
def tmpfs(tmp_path):
    """A small real file system of our own (root can mount one; elsewhere the test skips)."""
    mounts = []

    def mount(size: int, readonly: bool = False) -> Path:
        target = tmp_path / f"fs{len(mounts)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if readonly else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_full_disk_and_read_only_directory(tmp_path, tiny_tokenizer_dir, tmpfs, cli):
    recipe = _classify_recipe(tmp_path, tiny_tokenizer_dir)
    first = cli("finetune", str(recipe), "--out", str(tmp_path / "run"), "--set", "train.max_steps=6")
    assert first.returncode == 0, first.stderr.decode()[-2000:]
    size = sum(p.stat().st_size for p in (tmp_path / "run").iterdir())
    model = (tmp_path / "run" / "model.safetensors").stat().st_size
    disk = tmpfs(size + model // 2 + 64 * 1024)  # the checkpoint fits; a second copy does not
    run = disk / "run"
    shutil.copytree(tmp_path / "run", run)
    before = _digest(run)
    full = cli("finetune", str(recipe), "--out", str(run), "--resume", "--set", "train.max_steps=12")
    err = full.stderr.decode()
    assert full.returncode == 2 and "No space left on device" in err and "Traceback" not in err, err[-2000:]
    after = _digest(run)
    assert _checkpoint(after) == _checkpoint(before)
    assert not _leftovers(run)

    readonly = tmpfs(1 << 20, readonly=True)
    fresh = cli("finetune", str(recipe), "--out", str(readonly / "run"))
    assert fresh.returncode == 2 and "cannot create the output directory: Read-only file system" in fresh.stderr.decode()
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    frozen = cli("finetune", str(recipe), "--out", str(run), "--resume", "--set", "train.max_steps=12")
    err = frozen.stderr.decode()
    assert frozen.returncode == 2 and "Read-only file system" in err and "Traceback" not in err, err[-2000:]
    assert _digest(run) == after


def test_predict_to_a_full_disk_says_so(cli, tmp_path):
    """stdout on a full device (/dev/full): one clear line, exit 2."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full")
    trained = tmp_path / "run"
    recipe = _classify_recipe(tmp_path, _tokenizer(tmp_path))
    assert cli("finetune", str(recipe), "--out", str(trained), "--set", "train.max_steps=3").returncode == 0
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "bertcli", "predict", str(trained)], input=b"great film\n" * 50,
                              stdout=full, stderr=subprocess.PIPE, env=_env(tmp_path), timeout=120)
    err = done.stderr.decode()
    assert done.returncode == 2 and "No space left on device" in err and "Traceback" not in err, err


def _tokenizer(tmp_path: Path) -> Path:
    from bertcli.tokenizer import train_tokenizer

    corpus = tmp_path / "tok.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    train_tokenizer([corpus], vocab_size=300, min_frequency=1).save(tmp_path / "tok")
    return tmp_path / "tok"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_non_finite_loss(precision, tmp_path, tiny_tokenizer_dir, monkeypatch):
    """fp32 stops with a message and keeps the last checkpoint; bf16 skips the step and says so."""
    from bertcli.tasks.classify import ClassifyTask

    real, calls = ClassifyTask.loss, [0]

    def loss(self, model, batch, counts):
        calls[0] += 1
        value = real(self, model, batch, counts)
        return value * float("nan") if calls[0] == 8 else value

    monkeypatch.setattr(ClassifyTask, "loss", loss)
    recipe = load_recipe(_classify_recipe(tmp_path, tiny_tokenizer_dir), [f"train.precision={precision}",
                                                                           "train.max_steps=12"])
    run = tmp_path / "run"
    if precision == "fp32":
        with pytest.raises(BertcliError, match="the loss became nan at step 8.*last good checkpoint"):
            finetune(recipe, run, resume=False, overwrite=False)
        saved = torch.load(run / "resume.pt", weights_only=True)
        assert saved["position"][0] == 6 and all(torch.isfinite(t).all() for t in _weights(run).values())
        return
    metrics = finetune(recipe, run, resume=False, overwrite=False)
    skipped = [r for r in _records(run) if "skipped" in r]
    assert [r["step"] for r in skipped] == [8] and "update skipped" in skipped[0]["skipped"]
    assert [r["step"] for r in _records(run) if "loss" in r] == list(range(1, 13))
    assert all(torch.isfinite(t).all() for t in _weights(run).values()) and metrics["eval_accuracy"] > 0


def test_loss_that_stays_non_finite_stops_a_bf16_run(tmp_path, tiny_tokenizer_dir, monkeypatch):
    from bertcli.tasks.classify import ClassifyTask

    real = ClassifyTask.loss
    monkeypatch.setattr(ClassifyTask, "loss", lambda self, *a: real(self, *a) * float("inf"))
    recipe = load_recipe(_classify_recipe(tmp_path, tiny_tokenizer_dir), ["train.precision=bf16"])
    with pytest.raises(BertcliError, match="after 10 skipped steps in a row"):
        finetune(recipe, tmp_path / "run", resume=False, overwrite=False)


def test_storage_errors_name_the_file(tmp_path, monkeypatch):
    from bertcli.fileio import OutputError, atomic_write_text

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    (tmp_path / "kept.txt").write_text("old", encoding="utf-8")
    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match=r"kept.txt: cannot write: No space left on device \(free some space"):
        atomic_write_text(tmp_path / "kept.txt", "new")
    assert (tmp_path / "kept.txt").read_text() == "old" and os.listdir(tmp_path) == ["kept.txt"]
