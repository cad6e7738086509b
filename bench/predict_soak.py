"""Predict under load: N lines (default 100,000) through `bertcli predict` in a pipe, fed as
fast as predict takes them. Checks that every line is answered, in order (every 97th input line
is blank, so its answer must be the empty one, and only those), and samples predict's resident
memory as the answers come out, to show it stays flat. Prints one JSON line.

    python bench/predict_soak.py --model runs/sst2 --lines 100000

Without --model it first fine-tunes a quick SST-2 model (200 steps). Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, machine, note, quick_model  # noqa: E402

BLANK_EVERY = 97


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def feed(stdin, sentences: list[str], n: int) -> None:
    try:
        for i in range(n):
            text = "" if i % BLANK_EVERY == BLANK_EVERY - 1 else sentences[i % len(sentences)]
            stdin.write((text + "\n").encode())
        stdin.close()
    except BrokenPipeError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a fine-tuned SST-2 checkpoint (default: train a quick one)")
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    dev_file = SHARED_DATA / "sst2" / "dev.tsv"
    if not dev_file.is_file():
        sys.exit(f"{dev_file} is absent: this benchmark needs the real data sets")
    sentences = [line.split("\t")[0] for line in dev_file.read_text(encoding="utf-8").splitlines()[1:] if line.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or quick_model(Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bertcli", "predict", str(model)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        threading.Thread(target=feed, args=(proc.stdin, sentences, args.lines), daemon=True).start()
        samples, wrong, answered = [], [], 0
        marks = {int(args.lines * f) for f in (0.01, 0.1, 0.25, 0.5, 0.75, 0.99)}
        for line in proc.stdout:
            answer = json.loads(line)
            blank = answered % BLANK_EVERY == BLANK_EVERY - 1
            if (answer["label"] is None) != blank:
                wrong.append(answered)
            answered += 1
            if answered in marks:
                samples.append({"answered": answered, "rss_mb": round(rss_mb(proc.pid), 1),
                                "seconds": round(time.perf_counter() - start, 1)})
        err = proc.stderr.read().decode()
        proc.wait()
        seconds = time.perf_counter() - start
    rss = [s["rss_mb"] for s in samples]
    emit({"bench": "predict_soak", "machine": machine(), "lines": args.lines, "answered": answered,
          "exit_code": proc.returncode, "out_of_order_or_wrong": len(wrong), "seconds": seconds,
          "lines_per_s": answered / seconds, "rss_samples": samples,
          "rss_growth_mb_after_10pct": (rss[-1] - rss[1]) if len(rss) > 2 else None,
          "stderr_tail": err[-300:]})
    note(f"{answered}/{args.lines} answered, {len(wrong)} misplaced, RSS {rss}")


if __name__ == "__main__":
    main()
