"""The GLUE suite side by side: `bertcli finetune recipes/glue/*.yaml --out DIR` (one suite, in
process) against transformers' AutoModelForSequenceClassification trained by the loop of
finetune_compare.py, on the same recipes and settings (MiniLM, 3 epochs, lr 2e-5, batch 32, warmup
10%, weight decay 0.01, seed 42, bf16 autocast on both sides: the faster setting of each here).

Both sides read the same examples and are scored by the same decoding and GLUE metrics (CoLA
Matthews correlation, SST-2 and RTE accuracy, MRPC F1 and accuracy, STS-B Pearson and Spearman; a
task with two metrics counts their mean, as GLUE does). Times are end to end per task: reading
and encoding the data, loading the checkpoint, training and the evaluation on dev (bertcli's also
writes its checkpoints). transformers runs first: bertcli's training sets a process-wide malloc
policy (bertcli/allocator.py). Prints one JSON line.

    python bench/glue_compare.py                                  # the five tasks, as shipped
    python bench/glue_compare.py --tasks cola,mrpc,stsb,rte --max-train sst2=8000
    python bench/glue_compare.py --tasks cola,mrpc --skip-bertcli --set train.seed=1   # more seeds of one side

Needs transformers (it comes with the test extra) and ../shared/data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED_DATA, emit, machine, note  # noqa: E402
from finetune_compare import hf_train  # noqa: E402

from bertcli.recipes import load_recipe  # noqa: E402
from bertcli.suite import Point, run_suite, score  # noqa: E402
from bertcli.tasks import TASKS  # noqa: E402
from bertcli.tokenizer import load_tokenizer  # noqa: E402

GLUE = ("cola", "sst2", "mrpc", "stsb", "rte")


def first_rows(path: str, limit: int, header: bool, work: Path) -> str:
    """The first `limit` examples of a TSV file (after its header row, when it has one)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines(keepends=True)
    out = work / f"{Path(path).parent.name}-{limit}.tsv"
    out.write_text("".join(lines[:limit + header]), encoding="utf-8")
    return str(out)


def transformers_side(recipe) -> dict:
    """One task with transformers, end to end: data, model, training loop, evaluation on dev."""
    start = time.perf_counter()
    task = TASKS[recipe.task.name](load_tokenizer(recipe.model.init), recipe.task, recipe.data.max_seq_len)
    examples = [e for p in recipe.data.train for e in task.read(p)]
    eval_examples = [e for p in recipe.data.eval for e in task.read(p)]
    task.labels = task.labels_from(examples)
    metrics, _ = hf_train(recipe, "AutoModelForSequenceClassification", task, examples, eval_examples, "bf16")
    return {"metrics": {f"eval_{k}": v for k, v in metrics.items()}, "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(GLUE), help="comma-separated, of " + ", ".join(GLUE))
    parser.add_argument("--max-train", action="append", default=[], metavar="TASK=N",
                        help="train that task on its first N examples (repeatable)")
    parser.add_argument("--set", action="append", default=[], help="recipe overrides for every task, both sides")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--skip-transformers", action="store_true")
    skip.add_argument("--skip-bertcli", action="store_true", help="transformers' side alone (more seeds of it)")
    args = parser.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limits = {k: int(v) for k, _, v in (item.partition("=") for item in args.max_train)}
    if unknown := sorted(set(tasks) - set(GLUE) | set(limits) - set(GLUE)):
        sys.exit(f"not a GLUE task here: {', '.join(unknown)} (tasks: {', '.join(GLUE)})")
    if not SHARED_DATA.is_dir():
        sys.exit(f"{SHARED_DATA} is absent: this benchmark needs the real data sets")
    os.chdir(ROOT)  # the recipes name their data relative to the clone
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        points = []
        for name in tasks:
            source = ROOT / "recipes" / "glue" / f"{name}.yaml"
            overrides = ["train.save_every=null", *args.set]
            if name in limits:
                base = load_recipe(source, overrides)
                overrides.append(f"data.train={first_rows(base.data.train[0], limits[name], not base.task.columns, work)}")
            points.append(Point(name, name, source, load_recipe(source, overrides)))
        theirs = {}
        if not args.skip_transformers:
            for point in points:
                note(f"transformers: {point.name}")
                theirs[point.name] = transformers_side(point.recipe)
                theirs[point.name]["score"] = score(point, theirs[point.name]["metrics"])
        summary = None
        if not args.skip_bertcli:
            note("bertcli: the suite")
            start = time.perf_counter()
            summary = run_suite(points, work / "bertcli", resume=False, overwrite=False, keep_memory=True)
            ours_total = time.perf_counter() - start
    result = {"bench": "glue_compare", "machine": machine(), "tasks": {}, "max_train": limits, "set": args.set}
    for k, point in enumerate(points):
        headline = point.recipe.task.headline_metrics()
        entry: dict = {"headline": list(headline)}
        if summary is not None:
            row = summary["runs"][k]
            entry["bertcli"] = {**{m: row["metrics"].get(f"eval_{m}") for m in headline}, "score": row["score"],
                                "seconds": row["seconds"]}
        if point.name in theirs:
            hf = theirs[point.name]
            entry["transformers"] = {**{m: hf["metrics"].get(f"eval_{m}") for m in headline}, "score": hf["score"],
                                     "seconds": hf["seconds"]}
            if summary is not None:
                entry["difference_points"] = 100 * (entry["bertcli"]["score"] - hf["score"])
                entry["speedup"] = hf["seconds"] / entry["bertcli"]["seconds"]
        result["tasks"][point.name] = entry
    if summary is not None:
        result["bertcli"] = {"average": summary["average"], "seconds": ours_total}
    if theirs:
        scores = [t["score"] for t in theirs.values()]
        seconds = sum(t["seconds"] for t in theirs.values())
        result["transformers"] = {"average": sum(scores) / len(scores), "seconds": seconds}
        if summary is not None:
            result["speedup"] = seconds / ours_total
    emit(result)


if __name__ == "__main__":
    main()
