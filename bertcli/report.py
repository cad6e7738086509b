"""`bertcli evaluate --report DIR`: PNG figures of an evaluation and of its training run.
Needs matplotlib (pip install -e '.[report]')."""

from __future__ import annotations

import json
from pathlib import Path

from bertcli.errors import BertcliError
from bertcli.fileio import finite_number
from bertcli.textio import split_lines


def write_report(directory: Path, metrics: dict, model_dir: Path) -> list[Path]:
    """confusion.png (classification), loss.png and eval.png (from the run's log.jsonl)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BertcliError("--report needs matplotlib: pip install -e '.[report]' in bertcli's clone") from None
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    confusion = metrics.get("confusion")
    if confusion:
        labels = list(confusion)
        grid = [[confusion[g][p] for p in labels] for g in labels]
        fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(labels), 1 + 0.6 * len(labels)))
        ax.imshow(grid, cmap="Blues")
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("gold")
        top = max(max(row) for row in grid) or 1
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black")
        ax.set_title(f"accuracy {metrics['accuracy']:.4f}")
        fig.tight_layout()
        written.append(_save(fig, directory / "confusion.png", plt))
    records = _log_records(model_dir / "log.jsonl")
    steps = [r for r in records if finite_number(r.get("loss"))]
    if steps:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([r["step"] for r in steps], [r["loss"] for r in steps])
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        fig.tight_layout()
        written.append(_save(fig, directory / "loss.png", plt))
    evals = [r for r in records if any(k.startswith("eval_") for k in r)]
    if evals:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        keys = sorted({k for r in evals for k in r if k.startswith("eval_") and "loss" not in k and "perplexity" not in k})
        for key in keys:
            points = [(r["step"], r[key]) for r in evals if finite_number(r.get(key))]
            if not points:
                continue
            ax.plot(*zip(*points), marker="o", label=key.removeprefix("eval_"))
        ax.set_xlabel("step")
        ax.legend()
        fig.tight_layout()
        written.append(_save(fig, directory / "eval.png", plt))
    return written


def _log_records(path: Path) -> list[dict]:
    """log.jsonl's records that have a numeric step; torn, foreign or hand-edited lines are passed over."""
    if not path.is_file():
        return []
    records = []
    for line in split_lines(path.read_text(encoding="utf-8", errors="replace")):
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and finite_number(record.get("step")):
            records.append(record)
    return records


def _save(fig, path: Path, plt) -> Path:
    from bertcli.fileio import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
