"""Fuzzing the readers and predict's input parsers: any input gives data or a DataError."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bertcli.data.conll import read_ner  # noqa: E402
from bertcli.data.squad import read_squad  # noqa: E402
from bertcli.data.tables import read_rows  # noqa: E402
from bertcli.errors import DataError  # noqa: E402

# the same examples on every run (CI stays reproducible); a slow, busy machine is not a failure
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
# text built from the characters the formats care about, plus anything else
pieces = st.sampled_from(["\t", "\n", " ", ",", '"', "{", "}", "[", "]", ":", "O", "B-PER", "I-LOC", "E-X", "S-Y",
                          "-DOCSTART-", "label", "sentence", "text", "data", "paragraphs", "context", "qas",
                          "answers", "answer_start", "question", "\ufeff", "\x00", "é", "北京"])
structured = st.lists(st.one_of(pieces, st.text(max_size=5)), max_size=40).map("".join)


def _read(reader, path, data: bytes):
    path.write_bytes(data)
    try:
        reader(path)
    except DataError:
        pass


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), structured.map(lambda s: s.encode("utf-8", "surrogatepass"))))
@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".jsonl"])
def test_table_reader(tmp_path, suffix, data):
    _read(lambda p: list(read_rows(p)), tmp_path / f"d{suffix}", data)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), structured.map(lambda s: s.encode("utf-8", "surrogatepass"))))
@pytest.mark.parametrize("suffix", [".conll", ".jsonl"])
def test_conll_reader(tmp_path, suffix, data):
    _read(read_ner, tmp_path / f"d{suffix}", data)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["data", "paragraphs", "context", "qas", "question", "answers",
                                                "text", "answer_start", "id", "is_impossible"]), inner, max_size=4),
                           max_leaves=20)


@FUZZ
@given(doc=json_values)
def test_squad_reader(tmp_path, doc):
    import json

    _read(read_squad, tmp_path / "d.json", json.dumps(doc).encode())


@FUZZ
@given(line=st.one_of(st.text(max_size=80), json_values.map(lambda v: __import__("json").dumps(v))))
def test_predict_input_parsers(tiny_tokenizer_dir, line):
    from bertcli.tasks.classify import ClassifyOptions, ClassifyTask
    from bertcli.tasks.ner import NerOptions, NerTask
    from bertcli.tasks.qa import QaOptions, QaTask
    from bertcli.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_tokenizer_dir)
    for task in (ClassifyTask(tok, ClassifyOptions(), 32, ["a"]), NerTask(tok, NerOptions(), 32, ["O"]),
                 QaTask(tok, QaOptions(max_query_len=16), 64)):
        try:
            task.parse_input(line, "stdin: line 1")
        except DataError:
            pass


recipe_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                 st.sampled_from(["task", "model", "data", "train", "name", "init", "train", "eval",
                                                  "lr", "epochs", "max_seq_len", "batch_size", "labels", "precision",
                                                  "tokenizer", "output", "objective", "time_budget", "hidden_size"]),
                                 inner, max_size=5), max_leaves=25)


@FUZZ
@given(doc=st.one_of(recipe_values.map(lambda v: __import__("yaml").safe_dump(v)), structured))
def test_recipe_loader(tmp_path, doc):
    """Any YAML, well-formed or not, gives a recipe or one RecipeError (never another exception)."""
    from bertcli.errors import RecipeError
    from bertcli.recipes import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    try:
        load_recipe(path)
    except RecipeError:
        pass


config_values = st.dictionaries(st.sampled_from(["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                                 "intermediate_size", "max_position_embeddings", "type_vocab_size",
                                                 "architectures", "id2label", "label2id", "layer_norm_eps",
                                                 "hidden_act", "model_type", "bertcli_task"]),
                                json_values | st.integers(-3, 70), max_size=8)


@FUZZ
@given(config=st.one_of(config_values, json_values))
def test_checkpoint_config_reader(tmp_path, config):
    """A config.json from elsewhere gives a config or a CheckpointError naming it."""
    import json

    from bertcli.config import read_config
    from bertcli.errors import CheckpointError

    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    try:
        read_config(tmp_path)
    except CheckpointError as err:
        assert "config.json" in str(err)
