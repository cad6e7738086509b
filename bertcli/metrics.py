"""Task metrics over predictions and gold labels: plain Python, no torch, no model.

- classification: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix
- NER: entity-level precision/recall/F1 as seqeval's default (CoNLL) mode scores them
- QA: exact match and F1 as the official SQuAD v1.1 evaluation script computes them
  (answer normalisation, max over the gold answers); Chinese scored per character as CMRC does
"""

from __future__ import annotations

import collections
import re
import string
from typing import Iterable, Sequence


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ---------------------------------------------------------------- classification


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """accuracy, macro_f1, per_class {label: {precision, recall, f1, support}}, confusion[gold][pred]."""
    if len(gold) != len(pred):
        raise ValueError("gold and predicted label lists differ in length")
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for g, p in zip(gold, pred):
        confusion[g][p] += 1
    per_class = {}
    for label in labels:
        tp = confusion[label][label]
        fp = sum(confusion[g][label] for g in labels) - tp
        fn = sum(confusion[label].values()) - tp
        precision, recall, f1 = _prf(tp, fp, fn)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    correct = sum(g == p for g, p in zip(gold, pred))
    present = [label for label in labels if per_class[label]["support"] or any(p == label for p in pred)]
    return {
        "accuracy": correct / len(gold) if gold else 0.0,
        "macro_f1": sum(per_class[label]["f1"] for label in present) / len(present) if present else 0.0,
        "per_class": per_class,
        "confusion": confusion,
        "count": len(gold),
    }


# ---------------------------------------------------------------- NER (seqeval default mode)


def _split_tag(tag: str) -> tuple[str, str]:
    if tag in ("O", ""):
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if not kind:  # a bare type such as "PER" counts as I-PER, as seqeval does
        return "I", tag
    return prefix, kind


def _end_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        prev_tag in ("E", "S")
        or (prev_tag == "B" and tag in ("B", "S", "O"))
        or (prev_tag == "I" and tag in ("B", "S", "O"))
        or (prev_tag not in ("O", "") and prev_type != type_)
    )


def _start_of_chunk(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    return (
        tag in ("B", "S")
        or (prev_tag in ("E", "S", "O", "") and tag in ("I", "E"))
        or (tag not in ("O", "") and prev_type != type_)
    )


def get_entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, first, last) token indices, with seqeval's lenient default rules
    (an I- after O starts an entity, a type change ends one). Accepts IOB2, IOB1 and BIOES."""
    chunks = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate(list(tags) + ["O"]):
        t, kind = _split_tag(tag)
        if _end_of_chunk(prev_tag, t, prev_type, kind):
            chunks.append((prev_type, begin, i - 1))
        if _start_of_chunk(prev_tag, t, prev_type, kind):
            begin = i
        prev_tag, prev_type = t, kind
    return chunks


def entity_metrics(gold: Iterable[Sequence[str]], pred: Iterable[Sequence[str]]) -> dict:
    """Micro precision/recall/F1 over exact entity matches, per type too (seqeval default)."""
    gold_set, pred_set = set(), set()
    for index, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {index}: {len(g)} gold tags but {len(p)} predicted")
        gold_set.update((index, *e) for e in get_entities(g))
        pred_set.update((index, *e) for e in get_entities(p))
    types = sorted({e[1] for e in gold_set | pred_set})
    per_type = {}
    for kind in types:
        g = {e for e in gold_set if e[1] == kind}
        p = {e for e in pred_set if e[1] == kind}
        precision, recall, f1 = _prf(len(g & p), len(p - g), len(g - p))
        per_type[kind] = {"precision": precision, "recall": recall, "f1": f1, "support": len(g)}
    precision, recall, f1 = _prf(len(gold_set & pred_set), len(pred_set - gold_set), len(gold_set - pred_set))
    return {"precision": precision, "recall": recall, "f1": f1, "per_type": per_type, "entities": len(gold_set)}


# ---------------------------------------------------------------- extractive QA (SQuAD v1.1)


_CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff]")
_CMRC_PUNCT = set("-:_*^/\\~`+=，。：？！“”；’《》……·、「」（）－～『』") | set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and articles, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _tokens(text: str, chinese: bool) -> list[str]:
    if not chinese:
        return normalize_answer(text).split()
    # CMRC 2018: characters of CJK text one by one, other runs (Latin words, numbers) whole
    out, word = [], ""
    for ch in text.lower():
        if ch in _CMRC_PUNCT or ch.isspace():
            if word:
                out.append(word)
            word = ""
        elif _CJK.match(ch):
            if word:
                out.append(word)
            word = ""
            out.append(ch)
        else:
            word += ch
    if word:
        out.append(word)
    return out


def _f1(prediction: str, gold: str, chinese: bool) -> float:
    pred_tokens, gold_tokens = _tokens(prediction, chinese), _tokens(gold, chinese)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _em(prediction: str, gold: str, chinese: bool) -> float:
    if chinese:
        return float("".join(_tokens(prediction, True)) == "".join(_tokens(gold, True)))
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]], chinese: bool = False) -> dict:
    """exact_match and f1 in percent, each the max over an example's gold answers, averaged.
    An example with no gold answers (SQuAD v2) scores 1 when the prediction is empty."""
    em_total = f1_total = 0.0
    for prediction, answers in zip(predictions, golds):
        if not answers:
            em_total += float(prediction == "")
            f1_total += float(prediction == "")
            continue
        em_total += max(_em(prediction, a, chinese) for a in answers)
        f1_total += max(_f1(prediction, a, chinese) for a in answers)
    n = len(predictions)
    return {"exact_match": 100 * em_total / n if n else 0.0, "f1": 100 * f1_total / n if n else 0.0, "count": n}
