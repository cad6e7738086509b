"""Text classification (sentiment, topic, intent): single texts or pairs, any number of classes.
The sequence-level tasks (regression, multilabel) are built on it: they read the same columns
and differ in what a label is, the loss and the decoding."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

from bertcli.data.tables import read_rows
from bertcli.errors import DataError
from bertcli.metrics import classification_metrics
from bertcli.tasks.base import Task, TaskOptions, json_line, kl_sum, named, unique_labels

if TYPE_CHECKING:
    from torch import Tensor, nn

TEXT_COLUMNS = ("sentence", "text", "text_a", "sentence1", "review", "content")
PAIR_COLUMNS = ("text_b", "sentence2", "text_pair")  # text_pair: predict's own JSON lines
# GLUE's pair layouts whose first column is not a text column above: (text, pair), found together
PAIR_LAYOUTS = (("question", "sentence"), ("question1", "question2"))
# predict's JSON lines say `text` and `text_pair`: a pair under another name would be left unread (and a text
# under another name, where `text` is missing; beside it, such a field may be the line's own data)
OTHER_PAIRS = sorted({*PAIR_COLUMNS, *(layout[1] for layout in PAIR_LAYOUTS)} - {"text_pair"})
OTHER_TEXTS = sorted({*TEXT_COLUMNS, *(layout[0] for layout in PAIR_LAYOUTS)} - {"text"})


@dataclass(frozen=True)
class ClassifyOptions(TaskOptions):
    name: str = "classify"
    labels: tuple[str, ...] = ()  # label names, in head order; empty = the labels of the training data
    # TSV/CSV/JSONL columns; None = the usual names (sentence, text, text_a, ... / text_b, sentence2 / label)
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    # the column names of a TSV/CSV file without a header row (CoLA's); empty = the first row names them
    columns: tuple[str, ...] = ()
    positive_label: Optional[str] = None  # report precision, recall and f1 of this label (GLUE's MRPC F1)
    distillable: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = ("accuracy", "macro_f1", "matthews", "f1", "precision", "recall")
    default_headline: ClassVar[tuple[str, ...]] = ("accuracy",)

    def problems(self) -> list[str]:
        problems = unique_labels(self.labels) + column_problems(self.columns)
        if self.positive_label is None and {"f1", "precision", "recall"} & set(self.headline):
            problems.append("task.headline: f1, precision and recall are those of task.positive_label, which is not set")
        if self.positive_label is not None and self.labels and self.positive_label not in self.labels:
            problems.append(f"task.positive_label: {self.positive_label!r} is not one of task.labels")
        return problems


def column_problems(columns: Sequence[str]) -> list[str]:
    if any(not c.strip() or "\t" in c for c in columns):
        return ["task.columns: column names are not empty and hold no tabs"]
    if len(set(columns)) != len(columns):
        return ["task.columns: column names must be unique"]
    return []


@dataclass(frozen=True)
class Example:
    text: str
    pair: str | None = None
    label: Any = None  # a label name (classify), a number (regression), a tuple of names (multilabel)
    where: str = ""  # file:line, for messages


def label_order(names: set[str]) -> list[str]:
    """Numeric labels in numeric order (0, 1, 2, ..., 10), others alphabetically."""
    def integer(name: str) -> int | None:
        try:
            return int(name)
        except ValueError:  # "²" is a digit to str.isdigit() but not to int()
            return None

    if all(integer(n) is not None for n in names):
        return sorted(names, key=lambda n: (integer(n), n))
    return sorted(names)


class ClassifyTask(Task):
    name = "classify"
    architecture = "BertForSequenceClassification"
    Options = ClassifyOptions
    problem_type = "single_label_classification"
    needs_labels = True
    min_labels = 2
    label_columns: tuple[str, ...] = ("label",)  # looked for when task.label_column is not set
    options: ClassifyOptions

    # ------------------------------------------------------------ data

    def read(self, path: str | Path) -> list[Example]:
        examples, empty = [], []
        columns, header = None, {}
        for number, row in read_rows(path, self.options.columns, header):
            if columns is None:  # named by the header row, where a file has one
                columns = self._columns(path, f"line {header['line']} (the header)" if header else f"line {number}",
                                        list(row))
            text_key, pair_key, label_key = columns
            where = f"{path}: line {number}"
            if pair_key is None and any(key in row for key in PAIR_COLUMNS):  # a JSON line names its own fields
                found = next(key for key in PAIR_COLUMNS if key in row)
                raise DataError(f"{where}: a text pair ({found!r}), but the first row has none, so the file was "
                                "read as single texts: give every row the same fields (or set "
                                "task.text_pair_column)")
            for key in (text_key, pair_key, label_key):
                if key is not None and key not in row:
                    raise DataError(f"{where}: missing field {key!r}")
            text = row[text_key]
            if not isinstance(text, str) or (pair_key and not isinstance(row[pair_key], str)):
                raise DataError(f"{where}: the text must be a string")
            label = self.read_label(row[label_key], where)
            pair = row[pair_key].strip() if pair_key else None
            if not text.strip() and not pair:
                empty.append(where)
            examples.append(Example(text.strip(), pair, label, where))
        if not examples:
            raise DataError(f"{path}: no examples")
        if len(empty) == len(examples):
            raise DataError(f"{path}: every text is empty (is the text column the one named?)")
        if empty:  # kept: every row is scored, as other tools score the file, and said
            sys.stderr.write(f"{len(empty)} row(s) with an empty text, read as the model reads it: no words "
                             f"(first: {empty[0]})\n")
        return examples

    def read_label(self, value: Any, where: str) -> Any:
        """The label of one row, as the task holds it (DataError when it cannot be one)."""
        if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
            raise DataError(f"{where}: the label must be a non-empty string or integer, got {value!r}")
        return str(value).strip()

    def _columns(self, path, line: str, names: list[str]) -> tuple[str, str | None, str]:
        def pick(explicit: str | None, candidates: tuple[str, ...], what: str, required: bool) -> str | None:
            if explicit is not None:
                if explicit not in names:
                    raise DataError(f"{path}: {line}: no column {explicit!r} ({what}); columns: {', '.join(names)}")
                return explicit
            found = next((c for c in candidates if c in names), None)
            if found is None and required:
                raise DataError(f"{path}: {line}: no {what} column (looked for {', '.join(candidates)}); "
                                f"columns: {', '.join(names)}; name one so, or set task.{what.replace(' ', '_')}_column "
                                "in the recipe that trains on it")
            return found

        o = self.options
        layout = next((pair for pair in PAIR_LAYOUTS if set(pair) <= set(names)), None)
        if layout and o.text_column is None and o.text_pair_column is None:  # QNLI: the question, then the sentence
            return (*layout, pick(o.label_column, self.label_columns, "label", True))
        return (pick(o.text_column, TEXT_COLUMNS, "text", True), pick(o.text_pair_column, PAIR_COLUMNS, "text pair", False),
                pick(o.label_column, self.label_columns, "label", True))

    def labels_from(self, examples: Sequence[Example]) -> list[str]:
        if self.options.labels:
            return list(self.options.labels)
        labels = label_order({e.label for e in examples if e.label is not None})
        if len(labels) == 1:
            source = examples[0].where.rsplit(":", 1)[0]
            raise DataError(f"{source}: every example has the label {labels[0]!r}; a classifier learns from at "
                            "least two labels (or name them all in task.labels)")
        positive = self.options.positive_label
        if positive is not None and positive not in labels:
            raise DataError(f"task.positive_label: {positive!r} is not a label of the training data "
                            f"({', '.join(labels[:10])})")
        return labels

    def check_labels(self, examples: Sequence[Example]) -> None:
        unknown = sorted({e.label for e in examples} - set(self.labels))
        if unknown:
            first = next(e for e in examples if e.label in unknown)
            raise DataError(f"{first.where}: label {named([repr(first.label)])} is not one the model knows "
                            f"({named(self.labels)}); {len(unknown):,} unknown label(s): {named(unknown)}")

    def _encode_texts(self, examples: Sequence[Example]):
        paired = next((e for e in examples if e.pair is not None), None)
        if paired is not None and self.segments < 2:
            raise DataError(f"{paired.where}: a text pair, but the model has {self.segments} token type "
                            "(type_vocab_size): it reads single texts only")
        inputs = [(e.text, e.pair) if e.pair is not None else e.text for e in examples]
        return self.tokenizer.encode_truncated(inputs, self.max_seq_len)

    def encode(self, examples: Sequence[Example]) -> list[dict]:
        self.check_labels(examples)
        index = {name: i for i, name in enumerate(self.labels)}
        return [{"input_ids": enc.ids, "token_type_ids": enc.type_ids, "labels": self.target(e.label, index)}
                for e, enc in zip(examples, self._encode_texts(examples))]

    def target(self, label: Any, index: dict[str, int]) -> Any:
        """What the loss compares the head's output with, for one example's label (`index`: label -> id)."""
        return index[label]

    # ------------------------------------------------------------ model

    def counts(self, batch: dict[str, Tensor]) -> dict[str, int]:
        return {"examples": len(batch["labels"])}

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum") / counts["examples"]

    def soft_loss(self, logits: Tensor, teacher: Tensor, batch: dict[str, Tensor], counts: dict[str, int],
                  temperature: float) -> Tensor:
        return kl_sum(logits, teacher, temperature) / counts["examples"]  # each example's label distribution

    def parse_input(self, text: str, where: str) -> Example:
        """A line of text, or a JSON line {"text": ..., "text_pair": ...}: a line that starts with `{"` is
        read as JSON (a text that starts so is written as a JSON line)."""
        row = json_line(text, where)
        if row is not None:
            other = next((name for name in (*OTHER_PAIRS, *(() if "text" in row else OTHER_TEXTS)) if name in row),
                         None)
            if other is not None:
                raise DataError(f"{where}: a JSON line gives its text as 'text' and a pair's second text as "
                                f"'text_pair', not {other!r}")
            if not isinstance(row.get("text"), str):
                raise DataError(f"{where}: a JSON line needs a string field 'text'")
            pair = row.get("text_pair")
            if pair is not None and not isinstance(pair, str):
                raise DataError(f"{where}: 'text_pair' must be a string")
            if pair is not None and self.segments < 2:
                raise DataError(f"{where}: a text pair, but the model has {self.segments} token type "
                                "(type_vocab_size): it reads single texts only")
            if pair is not None and pair.strip() and not row["text"].strip():
                raise DataError(f"{where}: 'text' is empty and 'text_pair' is not: a pair's first text comes first")
            return Example(row["text"], pair, None, where)
        return Example(text, None, None, where)

    def predict(self, model: nn.Module, examples: Sequence[Example], batch_size: int, blank: bool = True) -> list[dict]:
        """One prediction per example; a blank line (predict's input) gets the empty answer, unless `blank` is
        False (labelled data, where every row is scored as the model reads it)."""
        results = [self.decode(None) for _ in examples]
        real = [i for i, e in enumerate(examples) if e.text.strip() or not blank]
        encodings = self._encode_texts([examples[i] for i in real])
        outputs = self.run(model, [{"input_ids": e.ids, "token_type_ids": e.type_ids} for e in encodings], batch_size)
        for i, enc, logits in zip(real, encodings, outputs):
            results[i] = self.decode(logits.tolist())
            if enc.overflowing:
                results[i]["truncated"] = True  # longer than data.max_seq_len: read on its first tokens
        return results

    def decode(self, logits: list[float] | None) -> dict:
        """The prediction for one text from its logits (None: an empty line)."""
        if logits is None:
            return {"label": None, "score": None, "scores": {}}
        top = max(logits)
        exps = [math.exp(x - top) for x in logits]
        total = sum(exps)
        probs = [x / total for x in exps]
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"label": self.labels[best], "score": round(probs[best], 6),
                "scores": {name: round(p, 6) for name, p in zip(self.labels, probs)}}

    def evaluate(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> dict:
        return self.score(examples, self.predict(model, examples, batch_size, blank=False))

    def score(self, examples: Sequence[Example], predictions: Sequence[dict]) -> dict:
        self.check_labels(examples)
        gold = [e.label for e in examples]
        pred = [p["label"] if p.get("label") is not None else self.labels[0] for p in predictions]
        return classification_metrics(gold, pred, self.labels, self.options.positive_label)
