"""Metrics against hand-worked cases and the published behaviour of seqeval and the SQuAD script."""

from __future__ import annotations

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
