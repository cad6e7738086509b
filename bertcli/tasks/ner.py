"""Named-entity recognition: a tag per word, learnt on the word's first sub-token; sentences or
documents longer than the window are split into overlapping windows at training, evaluation and
prediction time, and each word takes its prediction from the window where it has most context."""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Sequence, TypeVar

from bertcli.data.conll import Sentence, read_ner
from bertcli.data.windows import WINDOWS_AT_ONCE, best_window, spans
from bertcli.errors import DataError
from bertcli.metrics import entity_metrics, get_entities
from bertcli.tasks.base import Task, TaskOptions, json_line, kl_sum, named, unique_labels
from bertcli.tokenizer import WordPieceTokenizer

if TYPE_CHECKING:
    from torch import Tensor, nn


@dataclass(frozen=True)
class NerOptions(TaskOptions):
    name: str = "ner"
    labels: tuple[str, ...] = ()  # tag names, in head order; empty = "O" and the tags of the training data
    distillable: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = ("f1", "precision", "recall")
    default_headline: ClassVar[tuple[str, ...]] = ("f1",)

    def problems(self) -> list[str]:
        return unique_labels(self.labels)


T = TypeVar("T")
PIECE_WORDS = 20_000  # words encoded (and, in evaluation, tagged) together: encodings are large


@dataclass(frozen=True)
class Pieces:
    """A text as sub-tokens: ids, and for each word the index of its first sub-token (-1: none)."""

    ids: list[int]
    first: list[int]


def _up_to(items: Iterator[T], words: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive groups of items, each closed once it holds PIECE_WORDS words (or, at the end, fewer)."""
    group, count = [], 0
    for item in items:
        group.append(item)
        count += words(item)
        if count >= PIECE_WORDS:
            yield group
            group, count = [], 0
    if group:
        yield group


@dataclass(frozen=True)
class TextInput:
    """A raw line for predict: its words and their character spans in the line."""

    text: str
    words: tuple[str, ...]
    char_spans: tuple[tuple[int, int], ...]
    where: str


_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ceaf\U0002f800-\U0002fa1f"
_PIECE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")  # a CJK character alone, or a run of other text between spaces
_ABBREVIATION = re.compile(r"(?:[^\W\d_]\.)+")  # U.S., P.


def _punctuation(char: str) -> bool:
    """BERT's punctuation: Unicode's, and the ASCII symbols ($, +, <, =, >, ^, `, |, ~)."""
    return unicodedata.category(char).startswith("P") or char in "$+<=>^`|~"


def input_words(text: str) -> list[tuple[int, int]]:
    """The character spans of a raw line's words, as CoNLL-2003 and MSRA cut theirs (the words a tagger learns
    from): at spaces, each CJK character alone, and punctuation at a word's start or end alone, but for the
    periods of an abbreviation (`U.S.`, `P.`); a hyphen, an apostrophe or a period inside a word stays in it
    (`Chester-le-Street`, `3.5`), and so do combining marks (`José` in NFD)."""
    spans = []
    for piece in _PIECE.finditer(text):
        start, end = piece.span()
        lead = start
        while lead < end - 1 and _punctuation(text[lead]):
            spans.append((lead, lead + 1))
            lead += 1
        trail = end
        while trail > lead + 1 and _punctuation(text[trail - 1]):
            trail -= 1
        while trail < end and text[trail] == "." and _ABBREVIATION.fullmatch(text, lead, trail + 1):
            trail += 1
        spans.append((lead, trail))
        spans.extend((i, i + 1) for i in range(trail, end))
    return spans


class NerTask(Task):
    name = "ner"
    architecture = "BertForTokenClassification"
    Options = NerOptions
    needs_labels = True
    per_token = True
    options: NerOptions

    def __init__(self, tokenizer: WordPieceTokenizer, options: NerOptions, max_seq_len: int, labels: Sequence[str] = ()):
        super().__init__(tokenizer, options, max_seq_len, labels)
        self.window = max_seq_len - 2  # room for [CLS] and [SEP]
        self.step = max(1, self.window // 2)

    def read(self, path: str | Path) -> list[Sentence]:
        return read_ner(path)

    def labels_from(self, examples: Sequence[Sentence]) -> list[str]:
        if self.options.labels:
            return list(self.options.labels)
        tags = {t for e in examples for t in e.tags} - {"O"}
        if not tags and examples:
            source = examples[0].where.rsplit(":", 1)[0]
            raise DataError(f"{source}: every word is tagged O; a tagger learns from at least one entity (is the "
                            "tag the last column? or name the tags in task.labels)")
        return ["O"] + sorted(tags, key=lambda t: (t[2:], t[0]))

    def check_labels(self, examples: Sequence[Sentence]) -> None:
        known = set(self.labels)
        for e in examples:
            unknown = [t for t in e.tags if t not in known]
            if unknown:
                raise DataError(f"{e.where}: the sentence from this line has the tag {unknown[0]!r} (tags read as "
                                f"BIO), which is not one the model knows ({named(self.labels)})")

    def _pieces(self, word_lists: Sequence[Sequence[str]]) -> list[Pieces]:
        """Each text's sub-tokens, its words encoded PIECE_WORDS at a time (each word is cut into sub-tokens
        alone, so the pieces join into what one encoding gives, without a long text's encoding held whole)."""
        out = [Pieces([], []) for _ in word_lists]
        slices = ((k, begin) for k, words in enumerate(word_lists) for begin in range(0, len(words), PIECE_WORDS))
        for part in _up_to(slices, lambda s: min(PIECE_WORDS, len(word_lists[s[0]]) - s[1])):
            encodings = self.tokenizer.backend.encode_batch(
                [list(word_lists[k][begin:begin + PIECE_WORDS]) for k, begin in part], is_pretokenized=True,
                add_special_tokens=False)
            for (k, begin), enc in zip(part, encodings):
                pieces, offset = out[k], len(out[k].ids)
                first = [-1] * min(PIECE_WORDS, len(word_lists[k]) - begin)
                for position, word in enumerate(enc.word_ids):
                    if word is not None and first[word] < 0:
                        first[word] = offset + position
                pieces.ids.extend(enc.ids)
                pieces.first.extend(first)
        return out

    def _windows(self, pieces: Pieces) -> list[tuple[int, int]]:
        return spans(len(pieces.ids), self.window, self.step)

    def _feature(self, pieces: Pieces, start: int, end: int, tags: Sequence[str] | None) -> dict:
        feature = {"input_ids": [self.tokenizer.cls_id, *pieces.ids[start:end], self.tokenizer.sep_id],
                   "token_type_ids": [0] * (end - start + 2)}
        if tags is not None:
            index = {name: i for i, name in enumerate(self.labels)}
            labels = [-100] * len(feature["input_ids"])
            for word, position in enumerate(pieces.first):
                if start <= position < end:
                    labels[position - start + 1] = index[tags[word]]
            feature["labels"] = labels
        return feature

    def encode(self, examples: Sequence[Sentence]) -> list[dict]:
        self.check_labels(examples)
        return [self._feature(p, s, e, ex.tags) for ex, p in zip(examples, self._pieces([x.words for x in examples]))
                for s, e in self._windows(p)]

    def counts(self, batch: dict[str, Tensor]) -> dict[str, int]:
        return {"words": int((batch["labels"] != -100).sum())}

    def hard_loss(self, logits: Tensor, batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(), ignore_index=-100,
                               reduction="sum") / counts["words"]

    def soft_loss(self, logits: Tensor, teacher: Tensor, batch: dict[str, Tensor], counts: dict[str, int],
                  temperature: float) -> Tensor:
        words = batch["labels"] != -100  # the tag distributions of the tokens the loss is taken at: each word's first
        return kl_sum(logits[words], teacher[words], temperature) / counts["words"]

    def _tag_words(self, model: nn.Module, word_lists: Sequence[Sequence[str]], batch_size: int
                   ) -> list[list[tuple[str, float]]]:
        """(tag, probability) per word, each word read in the window where it has most context. Texts go
        through about PIECE_WORDS words at a time, and their windows WINDOWS_AT_ONCE at a time, each window
        reduced to its words' tags before the next: memory grows neither with the number of texts nor with a
        text's length (a CoNLL file without blank lines is one sentence)."""
        return [tags for group in _up_to(iter(word_lists), len) for tags in self._tag_group(model, group, batch_size)]

    def _tag_group(self, model: nn.Module, word_lists: Sequence[Sequence[str]], batch_size: int
                   ) -> list[list[tuple[str, float]]]:
        pieces = self._pieces(word_lists)
        windows = [self._windows(p) for p in pieces]
        results = [[("O", 1.0)] * len(p.first) for p in pieces]  # "O": a word with no sub-tokens (only controls)
        read_in: list[dict[int, list[int]]] = []  # per text: window -> the words it reads
        for p, spans_ in zip(pieces, windows):
            words: dict[int, list[int]] = {}
            for word, position in enumerate(p.first):
                if position >= 0:
                    words.setdefault(best_window(position, spans_), []).append(word)
            read_in.append(words)
        jobs = ((k, w) for k in range(len(pieces)) for w in range(len(windows[k])))
        while chunk := list(itertools.islice(jobs, WINDOWS_AT_ONCE)):
            outputs = self.run(model, [self._feature(pieces[k], *windows[k][w], None) for k, w in chunk], batch_size)
            for (k, w), rows in zip(chunk, outputs):
                start = windows[k][w][0]
                for word in read_in[k].get(w, ()):
                    row = rows[pieces[k].first[word] - start + 1].tolist()
                    best = max(range(len(row)), key=row.__getitem__)
                    results[k][word] = (self.labels[best], 1 / sum(math.exp(x - row[best]) for x in row))
        return results

    def parse_input(self, text: str, where: str) -> TextInput:
        """A line of text, or a JSON line {"text": ...} (a line that starts with `{"`), cut into words as the
        training data's are (`input_words`)."""
        row = json_line(text, where)
        if row is not None:
            if not isinstance(row.get("text"), str):
                raise DataError(f"{where}: a JSON line needs a string field 'text'")
            text = row["text"]
        char_spans = tuple(input_words(text))
        return TextInput(text, tuple(text[s:e] for s, e in char_spans), char_spans, where)

    def predict(self, model: nn.Module, examples: Sequence, batch_size: int) -> list[dict]:
        tagged = self._tag_words(model, [e.words for e in examples], batch_size)
        results = []
        for example, words in zip(examples, tagged):
            tags = [t for t, _ in words]
            if not isinstance(example, TextInput):
                results.append({"tags": tags})
                continue
            entities = []
            for kind, first, last in get_entities(tags):
                start, end = example.char_spans[first][0], example.char_spans[last][1]
                score = sum(p for _, p in words[first:last + 1]) / (last - first + 1)
                entities.append({"text": example.text[start:end], "label": kind, "start": start, "end": end,
                                 "score": round(score, 6)})
            results.append({"entities": entities})
        return results

    def score(self, examples: Sequence[Sentence], predictions: Sequence[dict]) -> dict:
        self.check_labels(examples)
        return entity_metrics([e.tags for e in examples], [p["tags"] for p in predictions])
