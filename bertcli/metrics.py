"""Task metrics over predictions and gold labels: plain Python, no torch, no model.

- classification: accuracy, macro-F1, per-class precision/recall/F1, confusion matrix
- regression: Pearson and Spearman correlation (as scipy.stats computes them), mean squared error
- multi-label: micro- and macro-averaged F1 (as scikit-learn's f1_score, zero_division=0), exact-set accuracy
- NER: entity-level precision/recall/F1 as seqeval's default (CoNLL) mode scores them
- QA: exact match and F1 as the official SQuAD v1.1 evaluation script computes them
  (answer normalisation, max over the gold answers); Chinese as the official CMRC 2018 script
  (v5) does: F1 from the longest common run of its mixed segmentation, EM without punctuation
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Sequence


def _prf(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


# ---------------------------------------------------------------- classification


def classification_metrics(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str],
                           positive: str | None = None) -> dict:
    """accuracy, macro_f1, matthews (Matthews correlation, multi-class form: GLUE's CoLA metric), with a
    `positive` label its precision, recall and f1 (GLUE's MRPC F1), per_class {label: {precision, recall,
    f1, support}}, confusion[gold][pred]."""
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
    metrics = {
        "accuracy": correct / len(gold) if gold else 0.0,
        "macro_f1": sum(per_class[label]["f1"] for label in present) / len(present) if present else 0.0,
        "matthews": matthews(confusion),
    }
    if positive is not None:
        metrics.update({k: per_class[positive][k] for k in ("f1", "precision", "recall")})
    return {**metrics, "per_class": per_class, "confusion": confusion, "count": len(gold)}


def matthews(confusion: dict[str, dict[str, int]]) -> float:
    """Matthews correlation of a confusion matrix (gold -> predicted -> count), in its multi-class
    form (Gorodkin 2004, as scikit-learn's matthews_corrcoef); 0.0 where it is undefined (one class
    alone predicted or given)."""
    labels = list(confusion)
    total = sum(sum(row.values()) for row in confusion.values())
    correct = sum(confusion[k][k] for k in labels)
    given = [sum(confusion[k].values()) for k in labels]
    predicted = [sum(confusion[g][k] for g in labels) for k in labels]
    covariance = correct * total - sum(p * t for p, t in zip(predicted, given))
    spread = (total * total - sum(p * p for p in predicted)) * (total * total - sum(t * t for t in given))
    return covariance / math.sqrt(spread) if spread > 0 else 0.0


# ---------------------------------------------------------------- regression


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; 0.0 when either side is constant (scipy gives NaN there, which no table can hold)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    return sxy / (math.sqrt(sxx) * math.sqrt(syy)) if sxx > 0 and syy > 0 else 0.0


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span (scipy.stats.rankdata's 'average')."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def regression_metrics(gold: Sequence[float], pred: Sequence[float]) -> dict:
    """pearson, spearman (GLUE's STS-B scores), mse, count."""
    if len(gold) != len(pred):
        raise ValueError("gold and predicted value lists differ in length")
    if not gold:
        return {"pearson": 0.0, "spearman": 0.0, "mse": 0.0, "count": 0}
    return {"pearson": pearson(pred, gold), "spearman": pearson(ranks(pred), ranks(gold)),
            "mse": sum((p - g) ** 2 for p, g in zip(pred, gold)) / len(gold), "count": len(gold)}


# ---------------------------------------------------------------- multi-label classification


def multilabel_metrics(gold: Sequence[Iterable[str]], pred: Sequence[Iterable[str]], labels: Sequence[str]) -> dict:
    """micro_f1, macro_f1 (the mean over every label, 0 for a label never given nor predicted),
    micro_precision, micro_recall, exact_match (the whole set right), per_class, count."""
    if len(gold) != len(pred):
        raise ValueError("gold and predicted label lists differ in length")
    counts = {label: [0, 0, 0] for label in labels}  # tp, fp, fn
    exact = 0
    for g, p in zip(gold, pred):
        g, p = set(g), set(p)
        exact += g == p
        for label in labels:
            if label in p:
                counts[label][0 if label in g else 1] += 1
            elif label in g:
                counts[label][2] += 1
    per_class = {}
    for label, (tp, fp, fn) in counts.items():
        precision, recall, f1 = _prf(tp, fp, fn)
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": tp + fn}
    tp, fp, fn = (sum(c[i] for c in counts.values()) for i in range(3))
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"micro_f1": f1, "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels) if labels else 0.0,
            "micro_precision": precision, "micro_recall": recall, "exact_match": exact / len(gold) if gold else 0.0,
            "per_class": per_class, "count": len(gold)}


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




def normalize_answer(text: str) -> str:
    """SQuAD v1.1: lower case, drop punctuation and articles, collapse white space."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = _tokens(prediction), _tokens(gold)
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _em(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def squad_v2_metrics(best: Sequence[str], margins: Sequence[float], golds: Sequence[Sequence[str]], threshold: float,
                     chinese: bool = False) -> dict:
    """What the official SQuAD v2.0 script adds: EM/F1 over the answerable questions (has_answer_*) and
    over the others (no_answer_*), and the best no-answer threshold on these questions (best_*): the
    questions sorted by margin (no-answer score minus best span score) and answered up to each in turn.
    `best` is each question's best non-empty span, `margins` its margin; a question is answered when
    its margin is at most `threshold`, as predict does. As in the script, a gold answer that
    normalises to nothing is no answer, and an unanswerable question's gold is the empty answer."""
    em, f1 = (cmrc_em, cmrc_f1) if chinese else (_em, _f1_v2)
    gold = [[a for a in g if (cmrc_segments(a, True) if chinese else _tokens(a))] or [""] for g in golds]
    has = [g != [""] for g in gold]
    raw = {"exact_match": [max(em(b, a) for a in g) for b, g in zip(best, gold)],
           "f1": [max(f1(b, a) for a in g) for b, g in zip(best, gold)]}
    answered = [m <= threshold for m in margins]
    out: dict = {}
    for name, scores in raw.items():
        final = [s if on else float(not h) for s, on, h in zip(scores, answered, has)]
        for group, wanted in (("has_answer", True), ("no_answer", False)):
            chosen = [x for x, h in zip(final, has) if h == wanted]
            out[f"{group}_{name}"] = 100 * sum(chosen) / len(chosen) if chosen else 0.0
        current = best_total = float(sum(not h for h in has))  # every question left unanswered
        best_threshold = 0.0
        for i in sorted(range(len(gold)), key=lambda i: margins[i]):
            current += scores[i] if has[i] else (-1.0 if best[i] else 0.0)
            if current > best_total:
                best_total, best_threshold = current, margins[i]
        out[f"best_{name}"] = 100 * best_total / len(gold) if gold else 0.0
        out[f"best_{name}_threshold"] = best_threshold
    out["has_answer_count"], out["no_answer_count"] = sum(has), len(has) - sum(has)
    return out


def _f1_v2(prediction: str, gold: str) -> float:
    """The v2 script's F1: as v1.1's, except that an empty answer against an empty one scores 1."""
    if not _tokens(prediction) or not _tokens(gold):
        return float(_tokens(prediction) == _tokens(gold))
    return _f1(prediction, gold)


# ---------------------------------------------------------------- CMRC 2018 (the official evaluation script, v5)

# the script's own list: "……" is two characters, so a single "…" is not among them, and ASCII punctuation
# other than these stays in the text
CMRC_PUNCT = frozenset(["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=", "，", "。", "：", "？", "！", "“", "”",
                        "；", "’", "《", "》", "……", "·", "、", "「", "」", "（", "）", "－", "～", "『", "』"])
_HAN = re.compile(r"[\u4e00-\u9fa5]")  # the script's range for a Chinese character


def cmrc_segments(text: str, drop_punctuation: bool = False) -> list[str]:
    """The script's mixed segmentation: each Chinese character (and each of its punctuation marks) a
    segment; runs of other characters split into words as NLTK's word tokenizer splits them. With
    `drop_punctuation` the marks are skipped without ending the run around them, as the script does."""
    segments, run = [], ""
    for ch in text.lower().strip():
        if drop_punctuation and ch in CMRC_PUNCT:
            continue
        if _HAN.match(ch) or ch in CMRC_PUNCT:
            if run:
                segments.extend(treebank_words(run))
                run = ""
            segments.append(ch)
        else:
            run += ch
    if run:
        segments.extend(treebank_words(run))
    return segments


def _longest_common_run(a: list[str], b: list[str]) -> int:
    """The length of the longest contiguous run of segments shared by `a` and `b`."""
    best, previous = 0, [0] * (len(b) + 1)
    for x in a:
        current = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                current[j + 1] = previous[j] + 1
                best = max(best, current[j + 1])
        previous = current
    return best


def cmrc_f1(prediction: str, gold: str) -> float:
    gold_segments, pred_segments = cmrc_segments(gold, True), cmrc_segments(prediction, True)
    common = _longest_common_run(gold_segments, pred_segments)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_segments), common / len(gold_segments)
    return 2 * precision * recall / (precision + recall)


def cmrc_em(prediction: str, gold: str) -> float:
    def bare(text: str) -> str:
        return "".join(ch for ch in text.lower().strip() if ch not in CMRC_PUNCT)

    return float(bare(prediction) == bare(gold))


# NLTK's word tokenizer (NLTKWordTokenizer, Apache-2.0), which the CMRC script applies to runs of
# non-Chinese text: regular-expression rewrites, then a split on white space. Its sentence splitter
# (Punkt, a trained model) is not run: an answer is one sentence or less.
_QUOTES_BEFORE = [(r"([«“‘„]|[`]+)", r" \1 "), (r'^\"', r"``"), (r"(``)", r" \1 "), (r'([ \(\[{<])(\"|\'{2})', r"\1 `` "),
                  (r"(?i)(?<!\w)(\')(?!(?:re|ve|ll|m|t|s|d|n)\b)(?=\w)", r"\1 ")]
_PUNCTUATION = [(r"([^\.])(\.)([\]\)}>\"\'»”’ ]*+)\s*$", r"\1 \2 \3 "), (r"([:,])([^\d])", r" \1 \2"), (r"([:,])$", r" \1 "),
                (r"\.{2,}", r" \g<0> "), (r"[;@#$%&]", r" \g<0> "), (r"[\u2012-\u2015]", r" \g<0> "),
                (r"([^\.])(\.)([\]\)}>\"\']*)\s*$", r"\1 \2\3 "), (r"[?!]", r" \g<0> "), (r"([^'])' ", r"\1 ' "),
                (r"[*]", r" \g<0> "), (r"[\]\[\(\)\{\}\<\>]", r" \g<0> "), (r"--", r" -- ")]
_QUOTES_AFTER = [(r"([»”’])", r" \1 "), (r"''", " '' "), (r'"', " '' "), (r"\s+", " "),
                 (r"([^' ])('[sS]|'[mM]|'[dD]|') ", r"\1 \2 "), (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 ")]
_CONTRACTIONS = [r"(?i)\b(can)(?#X)(not)\b", r"(?i)\b(d)(?#X)('ye)\b", r"(?i)\b(gim)(?#X)(me)\b", r"(?i)\b(gon)(?#X)(na)\b",
                 r"(?i)\b(got)(?#X)(ta)\b", r"(?i)\b(lem)(?#X)(me)\b", r"(?i)\b(more)(?#X)('n)\b",
                 r"(?i)\b(wan)(?#X)(na)(?=\s)", r"(?i) ('t)(?#X)(is)\b", r"(?i) ('t)(?#X)(was)\b"]
_TREEBANK = [(re.compile(a), b) for a, b in _QUOTES_BEFORE + _PUNCTUATION]
_TREEBANK_END = [(re.compile(a), b) for a, b in _QUOTES_AFTER] + [(re.compile(c), r" \1 \2 ") for c in _CONTRACTIONS]


def treebank_words(text: str) -> list[str]:
    for pattern, replacement in _TREEBANK:
        text = pattern.sub(replacement, text)
    text = f" {text} "
    for pattern, replacement in _TREEBANK_END:
        text = pattern.sub(replacement, text)
    return text.split()


def squad_metrics(predictions: Sequence[str], golds: Sequence[Sequence[str]], chinese: bool = False) -> dict:
    """exact_match and f1 in percent, each the max over an example's gold answers, averaged.
    An example with no gold answers (SQuAD v2) scores 1 when the prediction is empty."""
    em, f1 = (cmrc_em, cmrc_f1) if chinese else (_em, _f1)
    em_total = f1_total = 0.0
    for prediction, answers in zip(predictions, golds):
        if not answers:
            em_total += float(prediction == "")
            f1_total += float(prediction == "")
            continue
        em_total += max(em(prediction, a) for a in answers)
        f1_total += max(f1(prediction, a) for a in answers)
    n = len(predictions)
    return {"exact_match": 100 * em_total / n if n else 0.0, "f1": 100 * f1_total / n if n else 0.0, "count": n}
