"""Distillation shown: a 3-layer student taken from MiniLM's layers 0, 2 and 4 (the recipe's model.init), (a) fine-tuned alone
and (b) distilled from the fine-tuned 6-layer MiniLM (the teacher), the same steps and settings;
the score of teacher, (a) and (b) on the task's eval data, how much of the gap between (a) and the
teacher (b) recovers, each training's time (the teacher's forward pass per step is the cost of
distilling), and `bertcli predict` throughput of teacher and student over the same lines (whole
processes, start to exit). Prints one JSON line.

    python bench/distill_compare.py --task sst2 --epochs 1
    python bench/distill_compare.py --task conll --epochs 1
    python bench/distill_compare.py --task conll --epochs 1 --teacher runs/conll2003 --set train.lr=5e-4 \
        --distill-set train.distill_hidden=5 --distill-set model.dropout=0
    python bench/distill_compare.py --task sst2 --epochs 1 --teacher runs/sst2-minilm --set train.lr=2e-4 \
        --distill-set train.distill_cls=10 --distill-set model.dropout=0

Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, machine, note  # noqa: E402

from bertcli.jobs import finetune  # noqa: E402
from bertcli.recipes import load_recipe  # noqa: E402

TASKS = {  # recipe, headline metric, predict's input: (file, how to turn one of its lines into a predict line)
    "sst2": ("sentiment-sst2.yaml", "accuracy"),
    "conll": ("ner-conll2003.yaml", "f1"),
}


def predict_lines(task: str, count: int) -> bytes:
    """`count` lines of the task's eval text, repeated as needed."""
    if task == "sst2":
        rows = (SHARED_DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
        texts = [r.split("\t")[0] for r in rows]
    else:
        blocks = (SHARED_DATA / "conll2003" / "valid.txt").read_text(encoding="utf-8").split("\n\n")
        texts = [" ".join(line.split()[0] for line in b.splitlines() if line.strip() and not line.startswith("-DOCSTART-"))
                 for b in blocks]
        texts = [t for t in texts if t]
    return "".join(texts[i % len(texts)] + "\n" for i in range(count)).encode()


def predict_seconds(model: Path, lines: bytes) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bertcli", "predict", str(model)], input=lines, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=sorted(TASKS), default="sst2")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--layers", default="0,2,4", help="the teacher's layers the student starts from")
    parser.add_argument("--teacher", type=Path, default=None, help="an already fine-tuned teacher (else one is trained)")
    parser.add_argument("--lines", type=int, default=10_000, help="predict throughput over this many lines")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for all three runs")
    parser.add_argument("--distill-set", action="append", default=[],
                        help="overrides for the distilled student alone (e.g. train.distill_hidden=5)")
    args = parser.parse_args()
    if not SHARED_DATA.is_dir():
        sys.exit(f"{SHARED_DATA} is absent: this benchmark needs the real data sets")
    os.chdir(ROOT)
    recipe_file, headline = TASKS[args.task]
    source = ROOT / "recipes" / recipe_file
    common = [f"train.epochs={args.epochs}", "train.max_steps=null", "train.save_every=null", *args.set]
    result = {"bench": "distill_compare", "task": args.task, "machine": machine(), "epochs": args.epochs,
              "student_layers": args.layers, "set": args.set, "distill_set": args.distill_set}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        runs = {}
        teacher = args.teacher
        if teacher is None:
            note("training the teacher")
            start = time.perf_counter()
            metrics = finetune(load_recipe(source, common), work / "teacher", False, False, keep_memory=True)
            runs["teacher"] = {headline: metrics[f"eval_{headline}"], "seconds": time.perf_counter() - start}
            teacher = work / "teacher"
        else:
            from bertcli.evaluate import evaluate

            base = load_recipe(source, common)
            runs["teacher"] = {headline: evaluate(teacher, Path(base.data.eval[0]))[headline]}
        student = [f"model.init_layers=[{args.layers}]"]  # of the recipe's model.init: MiniLM
        for name, extra in [("alone", []), ("distilled", [f"model.teacher={teacher}", *args.distill_set])]:
            note(f"training the student: {name}")
            start = time.perf_counter()
            metrics = finetune(load_recipe(source, [*common, *student, *extra]), work / name, False, False,
                               keep_memory=True)
            runs[name] = {headline: metrics[f"eval_{headline}"], "seconds": time.perf_counter() - start}
        gap = runs["teacher"][headline] - runs["alone"][headline]
        result["runs"] = runs
        result["gap_recovered"] = (runs["distilled"][headline] - runs["alone"][headline]) / gap if gap else None
        lines = predict_lines(args.task, args.lines)
        result["predict_seconds"] = {"lines": args.lines, "teacher": predict_seconds(teacher, lines),
                                     "student": predict_seconds(work / "distilled", lines)}
    emit(result)


if __name__ == "__main__":
    main()
