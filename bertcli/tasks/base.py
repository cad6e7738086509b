"""The task interface: read examples, encode them (labels aligned to sub-words), compute the
loss, predict (decode model outputs into predictions) and score predictions. The training
loop, checkpointing and predict are written once against it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import Tensor, nn

from bertcli.tokenizer import WordPieceTokenizer


class Task(ABC):
    name: str
    architecture: str  # the Hugging Face class of the model with this task's head
    segments: int = 2  # token types the model has (config.json type_vocab_size): text pairs need 2

    def __init__(self, tokenizer: WordPieceTokenizer, max_seq_len: int, labels: Sequence[str] = (), **options: Any):
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.labels = list(labels)

    @abstractmethod
    def read(self, path: str | Path) -> list:
        """Labelled examples from a file (DataError naming the file and line when malformed)."""

    def labels_from(self, examples: Iterable) -> list[str]:
        """Label names found in training data (tasks without labels return [])."""
        return []

    def check_labels(self, examples: Sequence) -> None:
        """DataError naming the first example whose label the model does not know (tasks
        without labels accept every example)."""

    def saved_options(self) -> dict:
        """Settings learnt from the training data that predict needs (kept in config.json)."""
        return {}

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

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        """The summed loss of each term divided by its count over the whole step (all
        micro-batches and processes), so accumulation and DDP give the same mean as one batch."""

    @abstractmethod
    def parse_input(self, text: str, where: str) -> Any:
        """An unlabelled example from one line of predict's input."""

    @abstractmethod
    def predict(self, model: nn.Module, examples: Sequence, batch_size: int) -> list[dict]:
        """One JSON-ready prediction per example, in order."""

    @abstractmethod
    def score(self, examples: Sequence, predictions: Sequence[dict]) -> dict:
        """Metrics of predictions against the examples' gold labels (headline numbers first)."""

    def evaluate(self, model: nn.Module, examples: Sequence, batch_size: int) -> dict:
        return self.score(examples, self.predict(model, examples, batch_size))
