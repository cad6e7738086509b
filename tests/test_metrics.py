"""Metrics against hand-worked cases and the published behaviour of seqeval and the SQuAD script."""

from __future__ import annotations

import random

import pytest

from bertcli.metrics import classification_metrics, entity_metrics, get_entities, normalize_answer, squad_metrics


def test_classification_accuracy_macro_f1_and_confusion():
    m = classification_metrics(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert m["accuracy"] == 0.75
    assert m["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["confusion"] == {"a": {"a": 1, "b": 1}, "b": {"a": 0, "b": 2}}


def test_seqeval_readme_example():
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    m = entity_metrics(gold, pred)
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    assert m["per_type"]["PER"]["f1"] == 1.0 and m["per_type"]["MISC"]["f1"] == 0.0


def test_entities_in_each_scheme_and_lenient_default_mode():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    assert get_entities(["I-PER", "I-PER", "B-PER"]) == [("PER", 0, 1), ("PER", 2, 2)]  # IOB1
    assert get_entities(["B-PER", "E-PER", "S-LOC", "O"]) == [("PER", 0, 1), ("LOC", 2, 2)]  # BIOES
    assert get_entities(["O", "I-ORG", "I-ORG"]) == [("ORG", 1, 2)]  # an I- after O starts an entity
    assert get_entities(["B-PER", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 1)]  # a type change splits


def test_squad_normalisation_em_and_f1():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    m = squad_metrics(["Denver Broncos", "the Broncos", "Carolina"], [["Denver Broncos"], ["Denver Broncos", "Broncos"],
                                                                       ["Panthers"]])
    assert m["exact_match"] == pytest.approx(100 * 2 / 3)
    assert m["f1"] == pytest.approx(100 * 2 / 3)
    m = squad_metrics(["Denver"], [["Denver Broncos"]])
    assert m["exact_match"] == 0 and m["f1"] == pytest.approx(100 * 2 / 3)


def test_chinese_answers_scored_per_character():
    m = squad_metrics(["北京大学"], [["北京"]], chinese=True)
    assert m["exact_match"] == 0 and m["f1"] == pytest.approx(100 * 2 * (2 / 4) * 1 / (2 / 4 + 1))
    assert squad_metrics(["北京。"], [["北京"]], chinese=True)["exact_match"] == 100


# ---------------------------------------------------------------- CMRC 2018: the official script's scores


def _official_cmrc(prediction: str, answers: list[str]) -> tuple[float, float]:
    """The official CMRC 2018 evaluation (cmrc2018_evaluate.py v5: mixed_segmentation, find_lcs,
    calc_f1_score, calc_em_score) as it scores one question, written out here with NLTK itself;
    NLTK's sentence splitter is left out (it needs a trained model that is not installed)."""
    import re

    from nltk import word_tokenize

    sp_char = ['-', ':', '_', '*', '^', '/', '\\', '~', '`', '+', '=', '，', '。', '：', '？', '！', '“', '”', '；', '’',
               '《', '》', '……', '·', '、', '「', '」', '（', '）', '－', '～', '『', '』']

    def mixed_segmentation(in_str, rm_punc=False):
        in_str = str(in_str).lower().strip()
        segs_out, temp_str = [], ""
        for char in in_str:
            if rm_punc and char in sp_char:
                continue
            if re.search(r'[\u4e00-\u9fa5]', char) or char in sp_char:
                if temp_str != "":
                    segs_out.extend(word_tokenize(temp_str, preserve_line=True))
                    temp_str = ""
                segs_out.append(char)
            else:
                temp_str += char
        if temp_str != "":
            segs_out.extend(word_tokenize(temp_str, preserve_line=True))
        return segs_out

    def find_lcs(s1, s2):
        m = [[0 for _ in range(len(s2) + 1)] for _ in range(len(s1) + 1)]
        mmax = p = 0
        for i in range(len(s1)):
            for j in range(len(s2)):
                if s1[i] == s2[j]:
                    m[i + 1][j + 1] = m[i][j] + 1
                    if m[i + 1][j + 1] > mmax:
                        mmax, p = m[i + 1][j + 1], i + 1
        return s1[p - mmax:p], mmax

    f1_scores = []
    for ans in answers:
        ans_segs, prediction_segs = mixed_segmentation(ans, rm_punc=True), mixed_segmentation(prediction, rm_punc=True)
        _, lcs_len = find_lcs(ans_segs, prediction_segs)
        if lcs_len == 0:
            f1_scores.append(0)
            continue
        precision, recall = 1.0 * lcs_len / len(prediction_segs), 1.0 * lcs_len / len(ans_segs)
        f1_scores.append((2 * precision * recall) / (precision + recall))

    def remove_punctuation(in_str):
        return "".join(ch for ch in str(in_str).lower().strip() if ch not in sp_char)

    em = float(any(remove_punctuation(a) == remove_punctuation(prediction) for a in answers))
    return em, max(f1_scores)


def test_cmrc_scores_follow_the_official_script_where_it_differs_from_character_overlap():
    assert squad_metrics(["京北"], [["北京"]], chinese=True)["f1"] == 50.0  # shared characters would say 100
    assert squad_metrics(["北京 大学"], [["北京大学"]], chinese=True)["exact_match"] == 0  # a space is not punctuation
    assert squad_metrics(["《北京》"], [["北京"]], chinese=True)["exact_match"] == 100


@pytest.mark.slow
def test_cmrc_scores_equal_the_official_script_on_cmrc_2018_answers():
    """Every dev question's gold answers against predictions made from them (a gold answer, a part of
    one, one with its neighbours' text, another question's answer): EM and F1 equal the official
    script's, question by question."""
    import json
    import random

    pytest.importorskip("nltk", reason="the official script's word tokenizer comes from nltk (test extra)")
    from conftest import SHARED

    path = SHARED / "data" / "cmrc2018" / "cmrc2018_dev.json"
    if not path.is_file():
        pytest.skip(f"{path} is not here")
    from bertcli.metrics import cmrc_em, cmrc_f1

    questions = [[a["text"] for a in qa["answers"]] + [paragraph["context"]]
                 for article in json.loads(path.read_text())["data"] for paragraph in article["paragraphs"]
                 for qa in paragraph["qas"] if qa["answers"]]
    rng = random.Random(0)
    for answers in questions[:1500]:
        *gold, context = answers
        first = gold[0]
        start = context.find(first)
        cut = rng.randint(0, max(0, len(first) - 1))
        predictions = [first, first[cut:], first[:cut + 1] + " 2018 Beijing's", rng.choice(questions)[0],
                       context[max(0, start - 3):start + len(first) + 3] if start >= 0 else first + "。"]
        for prediction in predictions:
            expected = _official_cmrc(prediction, gold)
            got = (max(cmrc_em(prediction, a) for a in gold), max(cmrc_f1(prediction, a) for a in gold))
            assert got == pytest.approx(expected), (prediction, gold)


@pytest.mark.parametrize("text", ["Good muffins cost $3.88 (roughly 3,36 euros) in New York. Thanks.",
                                  "\"I can't,\" she said -- 'gonna' be there?", "U.S.A. 1990年代 a...b c;d @e #f"])
def test_word_splitting_equals_nltk(text):
    nltk = pytest.importorskip("nltk", reason="the reference word tokenizer comes from nltk (test extra)")
    from bertcli.metrics import treebank_words

    assert treebank_words(text) == nltk.word_tokenize(text, preserve_line=True)


def test_entity_scores_equal_seqeval_on_random_tag_sequences():
    """Property: on random sentences of tags in any scheme (IOB2, IOB1, BIOES and their mixtures, as
    real predictions are), entity precision, recall and F1 equal seqeval's default mode."""
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval is the reference (test extra)")
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    tag = st.sampled_from(["O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "I-MISC"])
    pair = st.integers(1, 12).flatmap(lambda n: st.tuples(st.lists(tag, min_size=n, max_size=n),
                                                          st.lists(tag, min_size=n, max_size=n)))

    @hypothesis.settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[hypothesis.HealthCheck.too_slow])
    @hypothesis.given(st.lists(pair, min_size=1, max_size=5))
    def check(sentences):
        gold, pred = [g for g, _ in sentences], [p for _, p in sentences]
        ours = entity_metrics(gold, pred)
        for name, reference in (("precision", seqeval.precision_score), ("recall", seqeval.recall_score),
                                ("f1", seqeval.f1_score)):
            assert ours[name] == pytest.approx(float(reference(gold, pred, zero_division=0))), (name, gold, pred)

    check()


def _official_v2(preds: dict, na_probs: dict, golds: dict, thresh: float) -> dict:
    """The official SQuAD v2.0 script (evaluate-v2.0.py: get_raw_scores, apply_no_ans_threshold,
    make_eval_dict, find_best_thresh) written out for one call, the reference here."""
    import collections as c
    import re as r
    import string as s_

    def normalize(text):
        text = "".join(ch for ch in text.lower() if ch not in set(s_.punctuation))
        return " ".join(r.sub(r"\b(a|an|the)\b", " ", text).split())

    def toks(text):
        return normalize(text).split() if text else []

    def exact(a, b):
        return int(normalize(a) == normalize(b))

    def f1(a_gold, a_pred):
        gold_toks, pred_toks = toks(a_gold), toks(a_pred)
        common = c.Counter(gold_toks) & c.Counter(pred_toks)
        num_same = sum(common.values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = 1.0 * num_same / len(pred_toks), 1.0 * num_same / len(gold_toks)
        return (2 * precision * recall) / (precision + recall)

    has_ans, exact_raw, f1_raw = {}, {}, {}
    for qid, answers in golds.items():
        gold_answers = [a for a in answers if normalize(a)] or [""]
        has_ans[qid] = gold_answers != [""]
        exact_raw[qid] = max(exact(a, preds[qid]) for a in gold_answers)
        f1_raw[qid] = max(f1(a, preds[qid]) for a in gold_answers)

    def threshold(scores):
        return {q: (float(not has_ans[q]) if na_probs[q] > thresh else scores[q]) for q in scores}

    def best(scores):
        cur = best_score = sum(1 for k in has_ans if not has_ans[k])
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda k: na_probs[k]):
            diff = scores[qid] if has_ans[qid] else (-1 if preds[qid] else 0)
            cur += diff
            if cur > best_score:
                best_score, best_thresh = cur, na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    out = {}
    for name, raw in (("exact_match", exact_raw), ("f1", f1_raw)):
        final = threshold(raw)
        for group, wanted in (("has_answer", True), ("no_answer", False)):
            chosen = [final[q] for q in final if has_ans[q] == wanted]
            out[f"{group}_{name}"] = 100.0 * sum(chosen) / len(chosen) if chosen else 0.0
        out[f"best_{name}"], out[f"best_{name}_threshold"] = best(raw)
    out["has_answer_count"] = sum(has_ans.values())
    out["no_answer_count"] = len(has_ans) - out["has_answer_count"]
    return out


def test_squad_v2_scores_equal_the_official_script():
    import random

    from bertcli.metrics import squad_v2_metrics

    words = ["Denver", "Broncos", "the", "Carolina", "Panthers", "a", "Super", "Bowl", "50", "."]
    rng = random.Random(1)
    for trial in range(300):
        n = rng.randint(1, 12)

        def phrase():
            return " ".join(rng.choice(words) for _ in range(rng.randint(1, 3)))

        golds = [[phrase() for _ in range(rng.randint(1, 2))] if rng.random() < 0.6 else [] for _ in range(n)]
        best = [phrase() if rng.random() < 0.9 else "" for _ in range(n)]
        margins = [rng.choice([-3.0, -1.0, -0.5, 0.0, 0.5, 2.0, rng.uniform(-4, 4)]) for _ in range(n)]
        threshold = rng.choice([0.0, -1.0, 1.0])
        ours = squad_v2_metrics(best, margins, golds, threshold)
        reference = _official_v2(dict(enumerate(best)), dict(enumerate(margins)), dict(enumerate(golds)), threshold)
        assert ours == pytest.approx(reference), (trial, best, margins, golds, threshold)


def test_matthews_and_positive_class_f1_equal_scikit_learn_on_random_labels():
    import warnings

    from sklearn.metrics import f1_score, matthews_corrcoef, precision_score, recall_score

    rng = random.Random(7)
    for _ in range(300):
        labels = [str(i) for i in range(rng.randint(2, 4))]
        gold = [rng.choice(labels) for _ in range(rng.randint(1, 40))]
        pred = [rng.choice(labels) if rng.random() < 0.6 else g for g in gold]
        if rng.random() < 0.1:
            pred = [labels[0]] * len(gold)  # one class alone predicted: Matthews is 0 by convention
        found = classification_metrics(gold, pred, labels, positive=labels[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert found["matthews"] == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)
            for name, reference in [("f1", f1_score), ("precision", precision_score), ("recall", recall_score)]:
                expected = reference(gold, pred, labels=[labels[1]], average="micro", zero_division=0)
                assert found[name] == pytest.approx(expected, abs=1e-12), name
    assert "f1" not in classification_metrics(["a", "b"], ["a", "a"], ["a", "b"])  # only with a positive label
