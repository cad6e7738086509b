"""The task interface: read examples, encode them (labels aligned to sub-words), compute the
loss, run the model over features in batches, decode its outputs into predictions and score
predictions. The training loop, checkpointing and predict are written once against it.

A task file imports torch inside the methods that run the model, never at the top: the recipe
loader reads every task's options class, and `bertcli --help` and recipe errors stay fast."""

from __future__ import annotations

import dataclasses
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Sequence

from bertcli.errors import DataError, NonFinite
from bertcli.textio import load_json
from bertcli.tokenizer import WordPieceTokenizer

if TYPE_CHECKING:
    from torch import Tensor, nn

    from bertcli.onnx_engine import OnnxModel

MAX_WINDOW = 1 << 20  # tokens in one sequence, and the like (a stride, a query): beyond any model


@dataclass(frozen=True)
class TaskOptions:
    """A recipe's `task:` section. Each task subclasses it with its own options, every one with
    a default; the recipe loader checks a section against the chosen task's class, and the same
    class reads the options back from a checkpoint's config.json (bertcli_task)."""

    name: str = ""  # each task's class sets its own name as the default
    # the eval metrics that rank runs in a suite or sweep (their mean, as GLUE averages a task's two
    # metrics); empty = the task's default_headline
    headline: tuple[str, ...] = ()
    # the shortest data.max_seq_len the task can work with ([CLS], a token or two, [SEP])
    min_seq_len: ClassVar[int] = 4
    command: ClassVar[str] = "finetune"  # the command that trains the task
    reads_directories: ClassVar[bool] = False  # data.train/eval may name directories (pretraining's shards)
    distillable: ClassVar[bool] = False  # learns from a teacher's outputs (model.teacher): the task has soft_loss
    metrics: ClassVar[tuple[str, ...]] = ()  # the eval metrics it reports where higher is better: headline's choices
    default_headline: ClassVar[tuple[str, ...]] = ()

    def problems(self) -> list[str]:
        """Values out of range, each as 'task.KEY: what is wrong' (types are checked already)."""
        return []

    def headline_metrics(self) -> tuple[str, ...]:
        return self.headline or self.default_headline

    def headline_problems(self) -> list[str]:
        """task.headline names metrics this task reports, each once (checked for every task)."""
        import difflib

        problems = []
        for name in self.headline:
            if name not in self.metrics:
                close = difflib.get_close_matches(name, self.metrics, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                problems.append(f"task.headline: {name!r} is not an eval metric of {self.name} that ranks runs{hint}; "
                                f"one of {', '.join(self.metrics)}")
        if len(set(self.headline)) != len(self.headline):
            problems.append("task.headline: names a metric twice")
        return problems

    def saved(self) -> dict[str, Any]:
        """What evaluate and predict need to rebuild the task (labels live in id2label)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items() if k != "labels"}


def positive(options: TaskOptions, *keys: str) -> list[str]:
    """Problems of the integer options `keys` that must lie in 1..MAX_WINDOW."""
    problems = []
    for key in keys:
        value = getattr(options, key)
        if not 0 < value <= MAX_WINDOW:
            problems.append(f"task.{key}: must be in 1..{MAX_WINDOW:,}, got {value}")
    return problems


def kl_sum(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """The summed KL divergence from the teacher's softmax to the student's over the last dimension, at
    `temperature`, times temperature^2, in fp32."""
    import torch.nn.functional as F

    return F.kl_div(F.log_softmax(student.float() / temperature, -1), F.log_softmax(teacher.float() / temperature, -1),
                    reduction="sum", log_target=True) * temperature ** 2


def named(names: Sequence[str], limit: int = 10, width: int = 60) -> str:
    """Names for a message, cut to fit one: at most `limit` of them, each of at most `width` characters
    (a wrong label column makes every text a label)."""
    def cut(name: str) -> str:
        return name if len(name) <= width else name[:width - 3] + "..."

    more = f" and {len(names) - limit:,} more" if len(names) > limit else ""
    return ", ".join(cut(n) for n in names[:limit]) + more


def unique_labels(labels: Sequence[str]) -> list[str]:
    return ["task.labels: label names must be unique"] if len(set(labels)) != len(labels) else []


class Task(ABC):
    name: ClassVar[str]
    architecture: ClassVar[str]  # the Hugging Face class of the model with this task's head (checkpoint.ARCHITECTURES)
    Options: ClassVar[type[TaskOptions]]
    problem_type: ClassVar[str | None] = None  # config.json problem_type, which tells transformers which loss
    needs_labels: ClassVar[bool] = False  # a checkpoint of this task must name its labels (id2label)
    min_labels: ClassVar[int] = 0  # the fewest labels its head can have
    outputs_needed: ClassVar[int | None] = None  # a head of exactly this many outputs, whatever their names
    two_segments: ClassVar[bool] = False  # every input is a pair (QA's question and context): needs 2 token types
    per_token: ClassVar[bool] = False  # the head scores every token (NER, QA), not the whole text
    output_names: ClassVar[tuple[str, ...]] = ("logits",)  # the head's outputs, as an exported graph names them
    segments: int = 2  # token types the model has (config.json type_vocab_size): text pairs need 2

    def __init__(self, tokenizer: WordPieceTokenizer, options: TaskOptions, max_seq_len: int,
                 labels: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.options = options
        self.max_seq_len = max_seq_len
        self.labels = list(labels)

    @property
    def outputs(self) -> int:
        """Size of the head's output (a classifier's label count)."""
        return max(len(self.labels), 1)

    @abstractmethod
    def read(self, path: str | Path) -> list:
        """Labelled examples from a file (DataError naming the file and line when malformed)."""

    def labels_from(self, examples: Iterable) -> list[str]:
        """Label names found in training data (tasks without labels return [])."""
        return []

    def head_labels(self, init_labels: list[str]) -> list[str]:
        """The labels to build the head with, given those of the checkpoint it starts from: the task's own
        (a different label set gets a new head)."""
        return self.labels

    def check_labels(self, examples: Sequence) -> None:
        """DataError naming the first example whose label the model does not know (tasks
        without labels accept every example)."""

    def saved_options(self) -> dict:
        """What predict and evaluate need (kept in config.json's bertcli_task): the options, and
        what was learnt from the training data."""
        return self.options.saved()

    @abstractmethod
    def encode(self, examples: Sequence) -> list[dict]:
        """Model features with training targets; one example may give several (windows)."""

    def collate(self, features: Sequence[dict], seeds: Sequence[int] | None = None) -> dict[str, Tensor]:
        """A padded batch. `seeds` (one per example) serve tasks that draw random masks."""
        from bertcli.data.batching import collate

        return collate(features, self.tokenizer.pad_id)

    @abstractmethod
    def counts(self, batch: dict[str, Tensor]) -> dict[str, int]:
        """How many targets each loss term has in this batch (examples, labelled tokens, ...)."""

    def loss(self, model: nn.Module, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        """The summed loss of each term divided by its count over the whole step (all
        micro-batches and processes), so accumulation and DDP give the same mean as one batch."""
        return self.hard_loss(self.call(model, batch), batch, counts)

    def hard_loss(self, outputs, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        """The task's loss of the model's outputs against the batch's labels (see `loss`)."""
        raise NotImplementedError(f"{type(self).__name__} computes its loss in `loss`")

    def soft_loss(self, outputs, teacher: Any, batch: dict[str, Tensor], counts: dict[str, int],
                  temperature: float) -> Tensor:
        """The distillation term: KL divergence from the teacher's distributions to the student's at
        `temperature`, times temperature^2 (Hinton et al.: the gradients keep their scale), over what the
        task's loss is taken over and divided by the same counts (tasks with `distillable`)."""
        raise NotImplementedError(f"{self.name} does not learn from a teacher")

    def distilled_loss(self, model: nn.Module, batch: dict[str, Tensor], counts: dict[str, int], teacher: nn.Module,
                       alpha: float, temperature: float) -> Tensor:
        """alpha x soft_loss + (1 - alpha) x the task's loss; the teacher runs on the same batch without
        gradients, under the same precision (the training step's autocast)."""
        import torch

        outputs = self.call(model, batch)
        with torch.no_grad():
            taught = self.call(teacher, batch)
        soft = self.soft_loss(outputs, taught, batch, counts, temperature)
        return alpha * soft + (1 - alpha) * self.hard_loss(outputs, batch, counts)

    def call(self, model: nn.Module, batch: dict[str, Tensor]):
        """The model's outputs for one inference batch (a tensor, or a tuple of them), each with the
        batch's rows first."""
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def run(self, model: nn.Module | OnnxModel, features: Sequence[dict], batch_size: int) -> list:
        """The model's outputs for each feature, in order, as CPU tensors or numpy arrays (a tuple of them for a
        head with several outputs). Features go through in batches of like lengths, for little padding;
        evaluate and predict set the precision around this. `model` is a torch module, or predict's ONNX
        Runtime engine (onnx_engine.OnnxModel), which pads the rows itself."""
        from bertcli.onnx_engine import OnnxModel

        results: list = [None] * len(features)
        order = sorted(range(len(features)), key=lambda i: -len(features[i]["input_ids"]))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            rows = [features[i] for i in chunk]
            parts = model(rows, self.tokenizer.pad_id) if isinstance(model, OnnxModel) else self._run_torch(model, rows)
            if not all(_finite(p) for p in parts):  # never scored, never answered (predict says so line by line)
                raise NonFinite(NON_FINITE)
            for row, i in enumerate(chunk):
                results[i] = parts[0][row] if len(parts) == 1 else tuple(p[row] for p in parts)
        return results

    def _run_torch(self, model: nn.Module, rows: Sequence[dict]) -> tuple[Tensor, ...]:
        import torch

        from bertcli.data.batching import collate

        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in collate(rows, self.tokenizer.pad_id).items()}
        with torch.inference_mode():
            out = self.call(model, batch)
        return tuple(t.cpu() if t.dtype == torch.long else t.float().cpu() for t in (out if isinstance(out, tuple) else (out,)))

    @abstractmethod
    def parse_input(self, text: str, where: str) -> Any:
        """An unlabelled example from one line of predict's input."""

    @abstractmethod
    def predict(self, model: nn.Module, examples: Sequence, batch_size: int) -> list[dict]:
        """One JSON-ready prediction per example, in order."""

    def score(self, examples: Sequence, predictions: Sequence[dict]) -> dict:
        """Metrics of predictions against the examples' gold labels (headline numbers first). A task
        scored otherwise (pretraining: its loss on held-out text) overrides `evaluate` instead."""
        raise NotImplementedError(f"{type(self).__name__} scores in evaluate, not from predictions")

    def evaluate(self, model: nn.Module, examples: Sequence, batch_size: int) -> dict:
        """Metrics of the model on labelled examples (evaluate, and eval during training)."""
        return self.score(examples, self.predict(model, examples, batch_size))


NON_FINITE = ("the model gave outputs that are not finite numbers (NaN or infinite), so they cannot be scored: it is "
              "broken, or overflows at this precision (fp32 does not overflow where bf16 or fp16 may)")


def _finite(values) -> bool:
    """Whether every value of an output (a numpy array from ONNX Runtime, or a torch tensor) is a finite
    number; torch is not imported for the first (predict's ONNX engine runs without it)."""
    import numpy as np

    if isinstance(values, np.ndarray):
        return not np.issubdtype(values.dtype, np.floating) or bool(np.isfinite(values).all())
    import torch

    return not values.is_floating_point() or bool(torch.isfinite(values).all())


_JSON_START = re.compile(r'\{\s*"')


def json_line(text: str, where: str) -> dict | None:
    """predict's line as a JSON object, where it is one; None for text. A line that starts with `{"` is read as
    JSON, and one that cannot be is an error (a text that starts so is written as {"text": ...})."""
    if not text.startswith("{"):
        return None
    try:
        row = load_json(text)
    except (ValueError, RecursionError) as err:
        if _JSON_START.match(text):
            raise DataError(f"{where}: a line starting with {{\" is read as a JSON line, and this one cannot be read "
                            f"({err}); a text that starts so is written as {{\"text\": ...}}") from None
        return None
    return row if isinstance(row, dict) else None
