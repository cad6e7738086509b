"""predict's engines against a plain ONNX Runtime script, whole processes from start to exit.

The baseline is what a user who leaves bertcli would write: the same fine-tuned checkpoint loaded
by transformers, exported by torch.onnx at opset 17, int8 by ONNX Runtime's `quantize_dynamic`
(its defaults), and a script that imports onnxruntime, tokenizers and numpy, reads stdin, sorts the
lines by length, runs batches of 32 with dynamic padding and prints a JSON label per line.

bertcli's side: `bertcli predict` with `--engine torch` (bf16, its default precision here),
`--engine torch --int8`, `--engine onnx` (model.onnx) and `--engine onnx --int8` (model.int8.onnx);
`bertcli export M --int8` is run first when the graphs are missing (they are written into M).

Inputs: the 872 SST-2 dev sentences, and them repeated 12 times (10,464 lines). Every process runs
`--rounds` times, the engines taking turns within a round; the medians are reported, with the dev
accuracy of each engine, the agreement of the ONNX engine's labels with the torch engine's in fp32
(and the largest score difference), and one line through each (whole process, median).
Prints one JSON line.

    python bench/predict_onnx.py --model runs/sst2-minilm

Needs the [onnx] extra, transformers (the test extra brings it) and ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, accuracy, emit, machine, note, quick_model, sst2_dev, timed  # noqa: E402

BASELINE = """
import json, sys
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer
graph, model_dir = sys.argv[1], sys.argv[2]
tokenizer = Tokenizer.from_file(model_dir + "/tokenizer.json")
tokenizer.no_padding()
tokenizer.enable_truncation(128)
session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
labels = json.load(open(model_dir + "/config.json"))["id2label"]
lines = sys.stdin.read().splitlines()
encodings = tokenizer.encode_batch(lines)
order = sorted(range(len(lines)), key=lambda i: len(encodings[i].ids))
answers = [None] * len(lines)
for start in range(0, len(order), 32):
    chunk = order[start:start + 32]
    width = max(len(encodings[i].ids) for i in chunk)
    feed = {k: np.zeros((len(chunk), width), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    for row, i in enumerate(chunk):
        n = len(encodings[i].ids)
        feed["input_ids"][row, :n] = encodings[i].ids
        feed["attention_mask"][row, :n] = 1
        feed["token_type_ids"][row, :n] = encodings[i].type_ids
    logits = session.run(None, {k: feed[k] for k in names})[0]
    for row, i in enumerate(chunk):
        answers[i] = labels[str(int(logits[row].argmax()))]
sys.stdout.write("".join(json.dumps({"label": a}) + "\\n" for a in answers))
"""
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
HF_EXPORT = """
import sys, warnings
import torch, transformers
from onnxruntime.quantization import QuantType, quantize_dynamic
warnings.simplefilter("ignore")
model = transformers.AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(1000, 2000, (2, 16))
names = ["input_ids", "attention_mask", "token_type_ids"]
torch.onnx.export(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), sys.argv[2] + "/model.onnx", dynamo=False,
                  opset_version=17, input_names=names, output_names=["logits"],
                  dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in names}, "logits": {0: "batch"}})
quantize_dynamic(sys.argv[2] + "/model.onnx", sys.argv[2] + "/model.int8.onnx", weight_type=QuantType.QInt8)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a fine-tuned SST-2 checkpoint (default: train a quick one)")
    parser.add_argument("--repeat", type=int, default=12, help="the long input is the dev sentences this many times")
    parser.add_argument("--rounds", type=int, default=3, help="runs of every process (the median is reported)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or quick_model(Path(tmp))
        if not (model / "model.onnx").is_file() or not (model / "model.int8.onnx").is_file():
            note(f"bertcli export {model} --int8")
            subprocess.run([sys.executable, "-m", "bertcli", "export", str(model), "--int8"], check=True, env=ENV)
        note("the baseline's graphs: transformers' model exported at opset 17, int8 by quantize_dynamic")
        subprocess.run([sys.executable, "-c", HF_EXPORT, str(model), tmp], check=True, env=ENV, capture_output=True)
        sentences, gold = sst2_dev(model)
        inputs = {"dev": "\n".join(sentences) + "\n", "many": "\n".join(sentences * args.repeat) + "\n"}
        ours = [sys.executable, "-m", "bertcli", "predict", str(model)]
        sides = {
            "bertcli_torch_bf16": [*ours, "--engine", "torch"],
            "bertcli_torch_int8": [*ours, "--engine", "torch", "--int8"],
            "bertcli_onnx_fp32": [*ours, "--engine", "onnx"],
            "bertcli_onnx_int8": [*ours, "--engine", "onnx", "--int8"],
            "ort_baseline_fp32": [sys.executable, "-c", BASELINE, f"{tmp}/model.onnx", str(model)],
            "ort_baseline_int8": [sys.executable, "-c", BASELINE, f"{tmp}/model.int8.onnx", str(model)],
        }
        result: dict = {"bench": "predict_onnx", "machine": machine(), "model": str(model), "rounds": args.rounds,
                        "lines": {"dev": len(sentences), "many": len(sentences) * args.repeat}}
        times: dict = {name: {side: [] for side in sides} for name in inputs}
        answers: dict = {}
        for round_ in range(args.rounds):
            for name, text in inputs.items():
                note(f"round {round_ + 1}/{args.rounds}: {name}")
                for side, cmd in sides.items():
                    seconds, out, said = timed(cmd, text)
                    times[name][side].append(seconds)
                    if name == "dev":
                        answers[side] = out
                        if side.startswith("bertcli"):
                            result.setdefault("engines_said", {})[side] = said.strip().splitlines()[0]
        for name in inputs:
            result[name] = {side: {"median_s": statistics.median(t), "runs_s": [round(x, 2) for x in t]}
                            for side, t in times[name].items()}
            for side in sides:
                if name == "dev":
                    result[name][side]["accuracy"] = accuracy(answers[side], gold)
            best = min((s for s in sides if s.startswith("bertcli")), key=lambda s: result[name][s]["median_s"])
            result[name]["fastest_bertcli"] = best
            result[name]["fastest_bertcli_vs_ort_int8"] = (result[name]["ort_baseline_int8"]["median_s"]
                                                           / result[name][best]["median_s"])
        note("agreement with the torch engine in fp32, and one line through each")
        _, reference, _ = timed([*ours, "--engine", "torch", "--precision", "fp32"], inputs["dev"])
        for side in ("bertcli_onnx_fp32", "bertcli_onnx_int8"):
            mine = answers[side]
            result["dev"][side]["labels_agree_with_torch_fp32"] = (
                sum(a["label"] == b["label"] for a, b in zip(mine, reference)) / len(reference))
            result["dev"][side]["max_score_difference"] = max(abs(a["score"] - b["score"]) for a, b in zip(mine, reference))
        one = {side: statistics.median(timed(cmd, "a gripping, funny film\n")[0] for _ in range(args.rounds))
               for side, cmd in sides.items()}
        result["one_line_s"] = one
    emit(result)


if __name__ == "__main__":
    main()
