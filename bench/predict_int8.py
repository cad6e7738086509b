"""predict's model time in fp32, bf16 autocast and int8 dynamic quantization (`predict --int8`),
with the accuracy each reaches, on the 872 SST-2 dev sentences. The model is loaded once and
the sentences scored in batches of 32, as predict does; loading and start-up are left out, so
the figures compare the arithmetic alone. Prints one JSON line.

    python bench/predict_int8.py --model runs/sst2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, quick_model, sst2_dev  # noqa: E402

from bertcli.jobs import load_for_task  # noqa: E402
from bertcli.predict import quantize_int8  # noqa: E402


def score(task, model, examples, labels, precision: str) -> dict:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        task.predict(model, examples[:64], 32)  # warm-up: kernels chosen for these shapes
        start = time.perf_counter()
        answers = list(task.predict(model, examples, 32))
        seconds = time.perf_counter() - start
    correct = sum(a["label"] == y for a, y in zip(answers, labels))
    return {"seconds": seconds, "sentences_per_s": len(examples) / seconds, "accuracy": correct / len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a fine-tuned SST-2 checkpoint (default: train a quick one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model_dir = args.model or quick_model(Path(work))
        texts, labels = sst2_dev(model_dir)
        ck, task = load_for_task(model_dir)
        examples = [task.parse_input(t.strip(), "dev") for t in texts]
        result = {"bench": "predict_int8", "machine": machine(), "model": str(model_dir), "sentences": len(texts)}
        result["fp32"] = score(task, ck.model, examples, labels, "fp32")
        result["bf16"] = score(task, ck.model, examples, labels, "bf16")
        result["int8"] = score(task, quantize_int8(ck.model), examples, labels, "fp32")
        result["int8_speedup_vs_bf16"] = result["bf16"]["seconds"] / result["int8"]["seconds"]
    emit(result)


if __name__ == "__main__":
    main()
