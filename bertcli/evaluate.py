"""`bertcli evaluate`: task metrics of a fine-tuned checkpoint on labelled data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from bertcli.fileio import atomic_write_text
from bertcli.jobs import load_for_task
from bertcli.train import autocast, resolve_precision


def evaluate(model_dir: Path, data: Path, batch_size: int = 64, precision: str = "auto") -> dict:
    ck, task = load_for_task(model_dir)
    examples = task.read(data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(precision, device)
    with torch.inference_mode(), autocast(device, precision):
        metrics = task.evaluate(ck.model.to(device).eval(), examples, batch_size)
    return {"task": task.name, "data": str(data), "precision": precision, **metrics}


def write_json(path: Path, metrics: dict) -> None:
    atomic_write_text(path, json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")


def render(metrics: dict) -> None:
    """The metrics as tables on stdout: headline numbers, per-class/per-type report, confusion."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
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
