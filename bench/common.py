"""Shared helpers for the benchmarks: the machine's measured peak, timing, JSON output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def measured_peak(dtype: torch.dtype, n: int = 2048, seconds: float = 2.0) -> float:
    """Matrix-multiply FLOP/s this machine reaches for `dtype` (the denominator of MFU)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "cores": os.cpu_count()}


def emit(result: dict) -> None:
    """One JSON line of results on stdout."""
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def note(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def quick_model(work: Path) -> Path:
    """A MiniLM fine-tuned for 200 steps on SST-2: enough to predict with in the predict benches."""
    from bertcli.jobs import finetune
    from bertcli.recipes import load_recipe

    note("fine-tuning a quick SST-2 model (200 steps) to predict with")
    recipe = load_recipe(ROOT / "recipes" / "sentiment-sst2.yaml", ["train.max_steps=200", "train.save_every=null"])
    finetune(recipe, work / "sst2", resume=False, overwrite=False)
    return work / "sst2"


def sst2_dev(model: Path) -> tuple[list[str], list[str]]:
    """The SST-2 dev sentences and their gold labels, named as `model` answers them."""
    import json

    dev_file = SHARED_DATA / "sst2" / "dev.tsv"
    if not dev_file.is_file():
        sys.exit(f"{dev_file} is absent: this benchmark needs the real data sets")
    rows = [line.split("\t") for line in dev_file.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    names = json.loads((model / "config.json").read_text())["id2label"]
    return [r[0] for r in rows], [names.get(r[1], r[1]) for r in rows]  # label ids in the data -> the model's names


def timed(cmd: list[str], text: str) -> tuple[float, list[dict], str]:
    """A whole process, start to exit, fed `text` on stdin: (seconds, its JSON lines, its stderr)."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    start = time.perf_counter()
    done = subprocess.run(cmd, input=text.encode(), capture_output=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd[:6])} failed:\n{done.stderr.decode()[-2000:]}")
    return seconds, [json.loads(line) for line in done.stdout.decode().splitlines()], done.stderr.decode()


def accuracy(answers: list[dict], gold: list[str]) -> float:
    return sum(a["label"] == g for a, g in zip(answers, gold)) / len(gold)

