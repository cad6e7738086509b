"""Sentence(-pair) regression, STS-B style: one number per text or text pair, learnt with mean
squared error, scored by Pearson and Spearman correlation. The head is transformers'
BertForSequenceClassification with one output and problem_type "regression"."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from bertcli.errors import DataError
from bertcli.metrics import regression_metrics
from bertcli.tasks.base import TaskOptions
from bertcli.tasks.classify import ClassifyTask, Example, column_problems

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class RegressionOptions(TaskOptions):
    name: str = "regression"
    # TSV/CSV/JSONL columns; None = the usual names (sentence1, text, ... / sentence2, text_b / score, label)
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    # the column names of a TSV/CSV file without a header row (CoLA's); empty = the first row names them
    columns: tuple[str, ...] = ()
    metrics: ClassVar[tuple[str, ...]] = ("pearson", "spearman")
    default_headline: ClassVar[tuple[str, ...]] = ("pearson",)

    def problems(self) -> list[str]:
        return column_problems(self.columns)


_NUMBER = re.compile(r"[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?")
MAX_TARGET = 1e12  # a score's size: its squared error (1e24) and a batch's sum stay far inside float32


class RegressionTask(ClassifyTask):
    name = "regression"
    Options = RegressionOptions
    problem_type = "regression"
    needs_labels = False
    min_labels = 0
    outputs_needed = 1  # one output, whatever config.json's id2label calls it
    label_columns = ("score", "label")

    def read_label(self, value: Any, where: str) -> float:
        """A number: from JSON, or text written as one in ASCII (Python's float() would also take 1_000 and
        full-width or Arabic-Indic digits)."""
        number = math.nan
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 1e300 else math.inf  # (a JSON integer of 400 digits)
        elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            number = float(value)
        if not math.isfinite(number):
            raise DataError(f"{where}: the label must be a finite number, got {value!r}")
        if abs(number) > MAX_TARGET:
            raise DataError(f"{where}: the label {value!r} is beyond ±{MAX_TARGET:.0e}; rescale the scores (squared "
                            "errors of such numbers overflow 32-bit floats)")
        return number

    def labels_from(self, examples: Sequence[Example]) -> list[str]:
        return ["score"]  # the one output's name in config.json's id2label

    def head_labels(self, init_labels: list[str]) -> list[str]:
        return init_labels if len(init_labels) == 1 else self.labels  # a regression head (LABEL_0, ...) is kept

    def check_labels(self, examples: Sequence[Example]) -> None:
        pass  # every finite number is a label (read_label checked each)

    def target(self, label: float, index: dict[str, int]) -> float:
        return label

    def hard_loss(self, outputs: Tensor, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        import torch.nn.functional as F

        return F.mse_loss(outputs.float().squeeze(-1), batch["labels"].float(), reduction="sum") / counts["examples"]

    def decode(self, logits: list[float] | None) -> dict:
        return {"value": None if logits is None else round(logits[0], 6)}

    def score(self, examples: Sequence[Example], predictions: Sequence[dict]) -> dict:
        pred = [p["value"] if p["value"] is not None else 0.0 for p in predictions]
        return regression_metrics([e.label for e in examples], pred)
