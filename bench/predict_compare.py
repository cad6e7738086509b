"""Predict side by side: `bertcli predict` in a pipe against a Hugging Face transformers
text-classification pipeline, on the same fine-tuned SST-2 checkpoint and the same lines.

Every figure is a whole process, start to exit, as a user meets it:
- throughput: the 872 SST-2 dev sentences, and a 10,000-line file made by repeating them,
  through `bertcli predict` (its default precision, and fp32) and through
  `transformers.pipeline` at its default batch size (1) and at batch 32;
- start-up: one line through each, against `python -c "import torch"` plus reading the
  weights with safetensors (the floor any PyTorch tool pays);
- accuracy of each side's answers on the dev sentences.
Prints one JSON line.

    python bench/predict_compare.py --model runs/sst2

Without --model it first fine-tunes a quick SST-2 model (200 steps). Needs transformers
(it comes with the test extra) and ../shared/data.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import accuracy, emit, machine, note, quick_model, sst2_dev, timed  # noqa: E402

HF_PIPELINE = """
import json, sys
from transformers import pipeline
classify = pipeline("text-classification", model=sys.argv[1], device=-1)
lines = sys.stdin.read().splitlines()
kwargs = {"batch_size": int(sys.argv[2])} if len(sys.argv) > 2 else {}
for answer in classify(lines, truncation=True, **kwargs):
    print(json.dumps(answer))
"""
FLOOR = """
import sys, torch
from safetensors.torch import load_file
load_file(sys.argv[1] + "/model.safetensors")
"""


def best_of(runs: int, cmd: list[str], text: str) -> tuple[float, list[dict]]:
    results = [timed(cmd, text) for _ in range(runs)]
    return min(r[0] for r in results), results[0][1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a fine-tuned SST-2 checkpoint (default: train a quick one)")
    parser.add_argument("--lines", type=int, default=10_000, help="size of the repeated-lines run")
    parser.add_argument("--repeats", type=int, default=3, help="start-up runs (the best is kept)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or quick_model(Path(tmp))
        sentences, gold = sst2_dev(model)
        dev = "\n".join(sentences) + "\n"
        many = "\n".join((sentences * (args.lines // len(sentences) + 1))[:args.lines]) + "\n"
        ours = [sys.executable, "-m", "bertcli", "predict", str(model)]
        hf = [sys.executable, "-c", HF_PIPELINE, str(model)]
        result: dict = {"bench": "predict_compare", "machine": machine(), "model": str(model), "lines": args.lines}

        note("start-up: one line")
        floor, _ = best_of(args.repeats, [sys.executable, "-c", FLOOR, str(model)], "")
        one_ours, _ = best_of(args.repeats, ours, "a gripping, funny film\n")
        one_hf, _ = best_of(args.repeats, hf, "a gripping, funny film\n")
        result["one_line_seconds"] = {"import_torch_and_read_weights": floor, "bertcli": one_ours,
                                      "transformers_pipeline": one_hf, "bertcli_over_floor": one_ours / floor}

        for name, text, n in [("dev", dev, len(sentences)), ("many", many, args.lines)]:
            note(f"throughput: {n} lines")
            runs = {"bertcli": ours, "bertcli_fp32": [*ours, "--precision", "fp32"],
                    "transformers_pipeline_batch32": [*hf, "32"]}
            if name == "dev" or n <= 2000:
                runs["transformers_pipeline_default"] = hf  # batch 1: too slow for the long file on 2 cores
            figures = {}
            for side, cmd in runs.items():
                seconds, answers, _ = timed(cmd, text)
                assert len(answers) == n, (side, len(answers))
                figures[side] = {"seconds": seconds, "sentences_per_s": n / seconds}
                if name == "dev":
                    figures[side]["accuracy"] = accuracy([{"label": a["label"]} for a in answers], gold)
            for side in list(figures):
                if side.startswith("transformers"):
                    figures[f"speedup_vs_{side}"] = figures["bertcli"]["sentences_per_s"] / figures[side]["sentences_per_s"]
            result[name] = figures
    emit(result)


if __name__ == "__main__":
    main()
