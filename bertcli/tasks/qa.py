"""Extractive question answering: [CLS] question [SEP] context window [SEP], windows `doc_stride`
tokens apart (the original BERT meaning: the step between window starts), an n-best search over
start/end pairs no longer than `max_answer_len`, and a no-answer score for SQuAD v2."""

from __future__ import annotations

import itertools
import math
import re
import sys
import unicodedata
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, NamedTuple, Sequence

from bertcli.data.squad import QaExample, read_squad
from bertcli.data.windows import WINDOWS_AT_ONCE, best_window, spans
from bertcli.errors import DataError
from bertcli.metrics import squad_metrics, squad_v2_metrics
from bertcli.tasks.base import Task, TaskOptions, kl_sum, positive
from bertcli.textio import load_json
from bertcli.tokenizer import WordPieceTokenizer

if TYPE_CHECKING:
    import numpy as np
    from torch import Tensor, nn

_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff]")


class Span(NamedTuple):
    answer: dict  # what predict prints
    best: str  # the best non-empty span's text, even when the answer is "no answer"
    margin: float  # the no-answer score minus the best span's; above task.no_answer_threshold, no answer


ENCODE_EXAMPLES = 2_000  # questions encoded (and, in evaluation, answered) together
NO_SPAN = Span({"answer": "", "start": None, "end": None, "score": None}, "", math.inf)


@dataclass
class Found:
    """What a question's windows have shown so far: the lowest no-answer score and the best spans."""
    null: float = math.inf
    candidates: list[tuple[float, int, int]] = field(default_factory=list)  # (score, first token, last token)


@dataclass(frozen=True)
class Encoded:
    question: list[int]
    context: array  # token ids (shared by the questions of one context)
    offsets: np.ndarray  # (tokens, 2): the character span of each context token
    windows: list[tuple[int, int]]  # [start, end) over context tokens
    cut: bool = False  # the question was longer than max_query_len tokens, and is read on its first ones


@dataclass(frozen=True)
class QaOptions(TaskOptions):
    name: str = "qa"
    doc_stride: int = 128  # context tokens between the starts of two windows
    max_query_len: int = 64  # question tokens kept
    max_answer_len: int = 30  # longest answer, in tokens
    n_best: int = 20  # start and end candidates searched per window
    no_answer_threshold: float = 0.0  # SQuAD v2: no answer when its score beats the best span's by more
    with_no_answer: bool = False  # SQuAD v2: may answer "" (also set when the training data has such questions)
    min_seq_len: ClassVar[int] = 12  # [CLS], a question token, [SEP], 8 context tokens, [SEP]
    distillable: ClassVar[bool] = True
    metrics: ClassVar[tuple[str, ...]] = ("f1", "exact_match")
    default_headline: ClassVar[tuple[str, ...]] = ("f1",)

    def problems(self) -> list[str]:
        return positive(self, "doc_stride", "max_query_len", "max_answer_len", "n_best")


class QaTask(Task):
    name = "qa"
    architecture = "BertForQuestionAnswering"
    Options = QaOptions
    two_segments = True
    per_token = True
    output_names = ("start_logits", "end_logits")
    options: QaOptions

    def __init__(self, tokenizer: WordPieceTokenizer, options: QaOptions, max_seq_len: int, labels: Sequence[str] = ()):
        super().__init__(tokenizer, options, max_seq_len, [])
        self.with_no_answer = options.with_no_answer
        self.doc_stride, self.max_query_len = options.doc_stride, options.max_query_len
        self.max_answer_len, self.n_best, self.threshold = options.max_answer_len, options.n_best, options.no_answer_threshold
        if max_seq_len - min(self.max_query_len, max_seq_len) - 3 < 8:
            raise DataError(f"data.max_seq_len {max_seq_len} leaves too little room for the context after "
                            f"task.max_query_len {self.max_query_len}")

    @property
    def outputs(self) -> int:
        return 2  # a start and an end score per token

    def saved_options(self) -> dict:
        return {**self.options.saved(), "with_no_answer": self.with_no_answer}

    def labels_from(self, examples: Sequence[QaExample]) -> list[str]:
        self.with_no_answer = self.with_no_answer or any(e.is_impossible for e in examples)
        return []

    def read(self, path: str | Path) -> list[QaExample]:
        examples, report = read_squad(path)
        if report.relocated or report.unlocated:
            sys.stderr.write(f"{path}: {report.relocated} answer start(s) re-located to where their text is; "
                             f"{len(report.unlocated)} answer(s) not found in their context, kept for scoring only" +
                             (f" (first: {report.unlocated[0]})" if report.unlocated else "") + "\n")
        return examples

    # ------------------------------------------------------------ encoding

    def _encode(self, examples: Sequence[QaExample]) -> list[Encoded]:
        """Each question with its context's tokens. A context is encoded once however many questions ask of it
        (SQuAD asks about five of each: twenty of one 2 MB context held 4.9 GB), in pieces, and held as compact
        arrays (WordPieceTokenizer.encode_compact)."""
        questions = self.tokenizer.backend.encode_batch([e.question for e in examples], add_special_tokens=False)
        unique = list(dict.fromkeys(e.context for e in examples))
        contexts = dict(zip(unique, self.tokenizer.encode_compact(unique)))
        out = []
        for e, q in zip(examples, questions):
            ids, offsets = contexts[e.context]
            qids = q.ids[:self.max_query_len]
            room = self.max_seq_len - len(qids) - 3
            out.append(Encoded(qids, ids, offsets, spans(len(ids), room, max(1, min(self.doc_stride, room))),
                               len(q.ids) > len(qids)))
        return out

    def _feature(self, enc: Encoded, start: int, end: int) -> dict:
        ids = [self.tokenizer.cls_id, *enc.question, self.tokenizer.sep_id, *enc.context[start:end], self.tokenizer.sep_id]
        first = len(enc.question) + 2
        return {"input_ids": ids, "token_type_ids": [0] * first + [1] * (end - start + 1)}

    def encode(self, examples: Sequence[QaExample]) -> list[dict]:
        unusable = [e for e in examples if e.gold and not e.answers]
        if unusable:
            sys.stderr.write(f"{len(unusable)} question(s) left out of training: none of their answers is in the "
                             f"context (first: {unusable[0].where})\n")
            examples = [e for e in examples if not (e.gold and not e.answers)]
        features = []
        for begin in range(0, len(examples), ENCODE_EXAMPLES):  # a piece at a time: encodings are large
            part = examples[begin:begin + ENCODE_EXAMPLES]
            features.extend(self._features(part, self._encode(part)))
        return features

    def _features(self, examples: Sequence[QaExample], encoded: Sequence[Encoded]) -> list[dict]:
        from bertcli.data.batching import compact  # (training only: predict never imports torch)

        features = []
        for ex, enc in zip(examples, encoded):
            first = len(enc.question) + 2
            inside = ()  # the answer's tokens: those whose characters overlap it
            if ex.answers:
                text, char_start = ex.answers[0]
                inside = ((enc.offsets[:, 1] > char_start) & (enc.offsets[:, 0] < char_start + len(text))).nonzero()[0]
            for start, end in enc.windows:
                feature = self._feature(enc, start, end)
                s_pos = e_pos = 0  # [CLS]: no answer in this window, or only part of it
                if len(inside) and start <= inside[0] and inside[-1] < end:
                    s_pos, e_pos = int(inside[0]) - start + first, int(inside[-1]) - start + first
                feature["start_positions"], feature["end_positions"] = s_pos, e_pos
                features.append(compact(feature))
        return features

    def counts(self, batch: dict[str, Tensor]) -> dict[str, int]:
        return {"windows": len(batch["start_positions"])}

    def hard_loss(self, outputs: tuple[Tensor, Tensor], batch: dict[str, Tensor], counts: dict[str, int]) -> Tensor:
        import torch.nn.functional as F

        start, end = outputs
        total = F.cross_entropy(start.float(), batch["start_positions"], reduction="sum") + \
            F.cross_entropy(end.float(), batch["end_positions"], reduction="sum")
        return total / (2 * counts["windows"])

    def soft_loss(self, outputs: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor], batch: dict[str, Tensor],
                  counts: dict[str, int], temperature: float) -> Tensor:
        """The start and end distributions over each window's tokens (padding left out on both sides)."""
        pad = batch["attention_mask"] == 0
        total = sum(kl_sum(s.float().masked_fill(pad, -1e4), t.float().masked_fill(pad, -1e4), temperature)
                    for s, t in zip(outputs, teacher))
        return total / (2 * counts["windows"])

    # ------------------------------------------------------------ prediction

    def parse_input(self, text: str, where: str) -> QaExample:
        if not text.strip():
            return QaExample(where, "", "", (), True, where)
        try:
            row = load_json(text)
        except (ValueError, RecursionError) as err:
            raise DataError(f"{where}: expected a JSON line {{\"question\": ..., \"context\": ...}} ({err})") from None
        if not isinstance(row, dict) or not isinstance(row.get("question"), str) or not isinstance(row.get("context"), str):
            raise DataError(f"{where}: expected string fields 'question' and 'context'")
        return QaExample(str(row.get("id", where)), row["question"], row["context"], (), False, where)

    def predict(self, model: nn.Module, examples: Sequence[QaExample], batch_size: int) -> list[dict]:
        return [span.answer for span in self._spans(model, examples, batch_size)]

    def evaluate(self, model: nn.Module, examples: Sequence[QaExample], batch_size: int) -> dict:
        """EM/F1 of the answers; for SQuAD v2 data also HasAns/NoAns and the best no-answer threshold
        on these examples, as the official v2 script reports them."""
        spans = self._spans(model, examples, batch_size)
        metrics = self.score(examples, [span.answer for span in spans])
        if self.with_no_answer or any(e.is_impossible for e in examples):
            metrics.update(squad_v2_metrics([span.best for span in spans], [span.margin for span in spans],
                                            [list(e.gold) for e in examples], self.threshold, self._chinese(examples)))
        return metrics

    def _spans(self, model: nn.Module, examples: Sequence[QaExample], batch_size: int) -> list[Span]:
        """The best span of each example. Examples go through ENCODE_EXAMPLES at a time, and their windows
        WINDOWS_AT_ONCE at a time, each window's logits reduced to its candidates before the next windows
        run: memory grows neither with the evaluation set nor with a context's length."""
        results: list[Span] = [NO_SPAN for _ in examples]
        real = [i for i, e in enumerate(examples) if e.context.strip() and e.question.strip()]
        for begin in range(0, len(real), ENCODE_EXAMPLES):
            part = real[begin:begin + ENCODE_EXAMPLES]
            encoded = self._encode([examples[i] for i in part])
            found = [Found() for _ in encoded]
            jobs = ((k, w) for k, enc in enumerate(encoded) for w in range(len(enc.windows)))
            while chunk := list(itertools.islice(jobs, WINDOWS_AT_ONCE)):
                outputs = self.run(model, [self._feature(encoded[k], *encoded[k].windows[w]) for k, w in chunk],
                                   batch_size)
                for (k, w), (start, end) in zip(chunk, outputs):
                    self._search(encoded[k], w, start.tolist(), end.tolist(), found[k])
            for k, enc in enumerate(encoded):
                span = self._best_span(examples[part[k]], enc, found[k])
                results[part[k]] = span._replace(answer={**span.answer, "truncated": True}) if enc.cut else span
        return results

    def _search(self, enc: Encoded, w: int, s_logits: list[float], e_logits: list[float], found: Found) -> None:
        """Adds window w's best start/end pairs to what the question's other windows have found."""
        first = len(enc.question) + 2
        start, end = enc.windows[w]
        found.null = min(found.null, s_logits[0] + e_logits[0])
        span = range(first, first + end - start)
        top_s = sorted(span, key=lambda i: -s_logits[i])[:self.n_best]
        top_e = sorted(span, key=lambda i: -e_logits[i])[:self.n_best]
        for si in top_s:
            token = si - first + start
            if best_window(token, enc.windows) != w:
                continue  # this start is read in the window where it has most context
            for ei in top_e:
                if si <= ei < si + self.max_answer_len:
                    found.candidates.append((s_logits[si] + e_logits[ei], token, ei - first + start))
        if len(found.candidates) > 4 * self.n_best:  # only the best n_best can be the answer or count in its score
            found.candidates = sorted(found.candidates, reverse=True)[:self.n_best]

    def _best_span(self, example: QaExample, enc: Encoded, found: Found) -> Span:
        candidates, null = found.candidates, found.null
        if not candidates:
            return NO_SPAN
        candidates.sort(reverse=True)
        candidates = candidates[:self.n_best]
        best_score, s_tok, e_tok = candidates[0]
        scores = [c[0] for c in candidates] + ([null] if self.with_no_answer else [])
        top = max(scores)
        total = sum(math.exp(x - top) for x in scores)
        char_start, char_end = int(enc.offsets[s_tok][0]), int(enc.offsets[e_tok][1])
        while char_end < len(example.context) and unicodedata.category(example.context[char_end]).startswith("M"):
            char_end += 1  # a combining mark the normalizer dropped (an accent, in NFD text) is the answer's too
        text = example.context[char_start:char_end]
        margin = null - best_score
        if self.with_no_answer and margin > self.threshold:
            return Span({"answer": "", "start": None, "end": None, "score": round(math.exp(null - top) / total, 6)},
                        text, margin)
        return Span({"answer": text, "start": char_start, "end": char_end,
                     "score": round(math.exp(best_score - top) / total, 6)}, text, margin)

    def score(self, examples: Sequence[QaExample], predictions: Sequence[dict]) -> dict:
        return squad_metrics([p["answer"] for p in predictions], [list(e.gold) for e in examples],
                             self._chinese(examples))

    @staticmethod
    def _chinese(examples: Sequence[QaExample]) -> bool:
        return sum(bool(_CJK.search(e.context)) for e in examples) > len(examples) / 2
