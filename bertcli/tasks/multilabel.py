"""Multi-label classification: any number of labels per text (none too), one yes/no output per
label, learnt with binary cross-entropy; a label is predicted when its probability reaches
task.threshold. Scored by micro- and macro-averaged F1. The head is transformers'
BertForSequenceClassification with problem_type "multi_label_classification"."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from bertcli.errors import DataError
from bertcli.metrics import multilabel_metrics
from bertcli.tasks.base import TaskOptions, named, unique_labels
from bertcli.tasks.classify import ClassifyTask, Example, column_problems, label_order

if TYPE_CHECKING:
    from torch import Tensor


@dataclass(frozen=True)
class MultiLabelOptions(TaskOptions):
    name: str = "multilabel"
    labels: tuple[str, ...] = ()  # label names, in head order; empty = the labels of the training data
    threshold: float = 0.5  # a label is predicted when its probability is at least this
    label_separator: str = ","  # between the labels of one row in a TSV/CSV cell (JSONL: a list)
    # TSV/CSV/JSONL columns; None = the usual names (sentence, text, ... / text_b, sentence2 / labels, label)
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    # the column names of a TSV/CSV file without a header row (CoLA's); empty = the first row names them
    columns: tuple[str, ...] = ()
    metrics: ClassVar[tuple[str, ...]] = ("micro_f1", "macro_f1", "exact_match", "micro_precision", "micro_recall")
    default_headline: ClassVar[tuple[str, ...]] = ("micro_f1",)

    def problems(self) -> list[str]:
        problems = unique_labels(self.labels) + column_problems(self.columns)
        if not 0 < self.threshold < 1:
            problems.append(f"task.threshold: must be between 0 and 1 (a probability), got {self.threshold}")
        if not self.label_separator or any(c in self.label_separator for c in "\t\r\n"):
            problems.append(f"task.label_separator: must be one or more characters other than tabs and line "
                            f"breaks, got {self.label_separator!r}")
            return problems
        for name in self.labels:
            if not name.strip() or name != name.strip() or self.label_separator in name:
                problems.append(f"task.labels: {name!r} cannot be a label name: names are not empty, have no spaces "
                                f"around them and do not hold task.label_separator ({self.label_separator!r})")
                break
        return problems


class MultiLabelTask(ClassifyTask):
    name = "multilabel"
    Options = MultiLabelOptions
    problem_type = "multi_label_classification"
    min_labels = 1
    label_columns = ("labels", "label")
    options: MultiLabelOptions

    def read_label(self, value: Any, where: str) -> tuple[str, ...]:
        separator = self.options.label_separator
        if isinstance(value, str):
            names = [n.strip() for n in value.split(separator)]
        elif isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            names = [str(v).strip() for v in value]
            odd = next((n for n in names if separator in n), None)
            if odd is not None:
                raise DataError(f"{where}: {odd!r} cannot be a label name: it holds task.label_separator "
                                f"({separator!r}), so no TSV or CSV row could name it")
        else:
            raise DataError(f"{where}: the labels must be a list of names, or names joined by {separator!r}, "
                            f"got {str(value)[:80]!r}")
        return tuple(sorted({n for n in names if n}))

    def labels_from(self, examples: Sequence[Example]) -> list[str]:
        if self.options.labels:
            return list(self.options.labels)
        labels = label_order({name for e in examples for name in e.label})
        if not labels:
            source = examples[0].where.rsplit(":", 1)[0]
            raise DataError(f"{source}: no example has a label; name the labels in task.labels")
        return labels

    def check_labels(self, examples: Sequence[Example]) -> None:
        known = set(self.labels)
        for e in examples:
            unknown = [name for name in e.label if name not in known]
            if unknown:
                raise DataError(f"{e.where}: label {named([repr(unknown[0])])} is not one the model knows "
                                f"({named(self.labels)})")

    def target(self, label: tuple[str, ...], index: dict[str, int]) -> list[int]:
        chosen = {index[name] for name in label}
        return [int(i in chosen) for i in range(len(self.labels))]

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        import torch.nn.functional as F

        total = F.binary_cross_entropy_with_logits(logits.float(), batch["labels"].float(), reduction="sum")
        return total / (counts["examples"] * len(self.labels))  # the mean over every (example, label), as transformers'

    def decode(self, logits: list[float] | None) -> dict:
        if logits is None:
            return {"labels": None, "scores": {}}  # a blank line: nothing was read (not: no label applies)
        probs = [0.5 * (1 + math.tanh(x / 2)) for x in logits]  # the sigmoid, without overflow
        return {"labels": [name for name, p in zip(self.labels, probs) if p >= self.options.threshold],
                "scores": {name: round(p, 6) for name, p in zip(self.labels, probs)}}

    def score(self, examples: Sequence[Example], predictions: Sequence[dict]) -> dict:
        self.check_labels(examples)
        return multilabel_metrics([e.label for e in examples], [p["labels"] or () for p in predictions], self.labels)
