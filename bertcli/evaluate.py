"""`bertcli evaluate`: task metrics of a fine-tuned checkpoint on labelled data."""

from __future__ import annotations

from pathlib import Path

import torch

from bertcli.errors import BertcliError
from bertcli.fileio import atomic_write_text, finite_json
from bertcli.jobs import load_for_task
from bertcli.runtime import autocast, inference


def evaluate(model_dir: Path, data: Path, batch_size: int = 64, precision: str = "auto") -> dict:
    ck, task = load_for_task(model_dir)
    examples = task.read(data)
    device, precision = inference(precision)
    with torch.inference_mode(), autocast(device, precision):
        metrics = task.evaluate(ck.model.to(device).eval(), examples, batch_size)
    # the run's precision under its own name: "precision" is a metric of NER and of the classes
    return {"task": task.name, "data": str(data), "inference_precision": precision, **metrics}


def check_outputs(out: Path | None, report: Path | None, inputs: list[Path]) -> None:
    """--out names a file whose directory exists; --report a directory (or a path to make one);
    neither may be one of the inputs or inside the model directory's own files."""
    from bertcli.rundir import check_apart, inside, precheck, refuse_inside_running_suite, resolved

    if out is not None:
        refuse_inside_running_suite(out)
        if out.is_dir():
            raise BertcliError(f"--out {out}: is a directory; name a file, e.g. {out / 'metrics.json'}")
        if not out.parent.is_dir():
            raise BertcliError(f"--out {out}: the directory {out.parent} does not exist")
        if out.exists() and any(resolved(out) == resolved(p) for p in inputs):
            raise BertcliError(f"--out {out}: is an input of this command; name another file")
        if out.is_symlink() or (out.exists() and not out.is_file()):
            raise BertcliError(f"--out {out}: is a link or a special file, which bertcli does not replace; name a "
                               "new file")
        if out.is_file() and not _written_here(out):
            raise BertcliError(f"--out {out}: exists and is not an earlier `bertcli evaluate --out`, so it is kept; "
                               "name a new file")
        if inside(resolved(out), resolved(inputs[0])):
            raise BertcliError(f"--out {out}: lies inside the model directory, which bertcli only reads here; "
                               "name a file elsewhere")
        if report is not None and inside(resolved(out), resolved(report)):
            raise BertcliError(f"--out {out}: lies inside the --report directory, which holds the figures alone; "
                               "name a file elsewhere")
    if report is not None:
        if report.exists() and not report.is_dir():
            raise BertcliError(f"--report {report}: exists and is not a directory; name a directory for the figures")
        check_apart(report, [("MODEL_DIR", inputs[0]), ("--data", inputs[1])])
        precheck(report, "report", overwrite=True, replacing="--report")


SEAL = "bertcli_sha256"  # the SHA-256 of the file's other content, as write_json writes it


def _written_here(path: Path) -> bool:
    """Whether `path` holds what write_json wrote: its seal matches the rest. A file of bertcli's from before
    the seal is one that reads as nothing else would: a task's name, the data, and the precision it ran in
    (`inference_precision`, or `precision` as bertcli 0.1 named it)."""
    import json

    from bertcli.tasks import TASKS

    try:
        if path.stat().st_size > 64 << 20:
            return False
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    if not isinstance(found, dict):
        return False
    if SEAL in found:
        seal = found.pop(SEAL)
        try:
            return isinstance(seal, str) and seal == _seal(found)
        except RecursionError:
            return False
    precision = found.get("inference_precision", found.get("precision"))
    return found.get("task") in TASKS and isinstance(found.get("data"), str) and precision in ("fp32", "bf16", "fp16")


def _seal(metrics: dict) -> str:
    import hashlib

    return hashlib.sha256(finite_json(metrics, indent=2, ensure_ascii=False).encode("utf-8")).hexdigest()


def write_json(path: Path, metrics: dict) -> None:
    atomic_write_text(path, finite_json({**metrics, SEAL: _seal(metrics)}, indent=2, ensure_ascii=False) + "\n")


def render(metrics: dict) -> str:
    """The metrics as tables for stdout: headline numbers, per-class/per-type report, confusion.
    Rendered into a string, so that a closed stdout is the caller's to handle (rich would exit 1)."""
    import io
    import shutil
    import sys

    from rich.console import Console
    from rich.table import Table

    terminal = sys.stdout is not None and sys.stdout.isatty()
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, markup=False, emoji=False,  # the user's text as it is
                      width=shutil.get_terminal_size().columns if terminal else 100)
    console.print(f"{metrics['task']} on {metrics['data']}", highlight=False)
    head = Table()
    head.add_column("metric")
    head.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, float):
            head.add_row(key, f"{value:.4f}")
        elif isinstance(value, int) and not isinstance(value, bool):
            head.add_row(key, str(value))
    console.print(head)
    report = metrics.get("per_class") or metrics.get("per_type")
    if report:
        table = Table(title="per class" if "per_class" in metrics else "per entity type")
        for column in ("label", "precision", "recall", "f1", "support"):
            table.add_column(column, justify="left" if column == "label" else "right")
        for label, row in report.items():
            table.add_row(label, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}", str(row["support"]))
        console.print(table)
    confusion = metrics.get("confusion")
    if confusion and len(confusion) <= 20:
        table = Table(title="confusion (rows: gold, columns: predicted)")
        table.add_column("")
        for label in confusion:
            table.add_column(label, justify="right")
        for gold, row in confusion.items():
            table.add_row(gold, *(str(row[p]) for p in confusion))
        console.print(table)
    return buffer.getvalue()
