"""Checkpoints: round trip, Hugging Face layout and compatibility, refusing what is unsafe or inconsistent."""

from __future__ import annotations

import json
import pickle
import re

import pytest
import torch

from bertcli.checkpoint import ARCHITECTURES, load_checkpoint, save_checkpoint
from bertcli.errors import CheckpointError
from bertcli.model import BertConfig
from bertcli.tokenizer import load_tokenizer

LABELS = ["negative", "neutral", "positive"]


def tiny_config(vocab_size: int) -> BertConfig:
    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)


def build(architecture: str, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = ARCHITECTURES[architecture](tiny_config(tok.vocab_size), len(LABELS)).eval()
    return model, tok


def batch(tok):
    encs = tok.encode_batch(["the quick brown fox", "hello world"])
    width = max(len(e.ids) for e in encs)
    ids = torch.tensor([e.ids + [0] * (width - len(e.ids)) for e in encs])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encs])
    return ids, mask


def outputs(model, ids, mask):
    with torch.no_grad():
        out = model(ids, mask) if not hasattr(model, "cls") else model(ids, mask, mlm_positions=mask.bool())
    return [o for o in (out if isinstance(out, tuple) else (out,)) if o is not None]


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_round_trip_gives_identical_outputs(architecture, tiny_tokenizer_dir, tmp_path):
    model, tok = build(architecture, tiny_tokenizer_dir)
    labels = LABELS if "Classification" in architecture else None
    save_checkpoint(tmp_path / "ck", model, architecture, tok, labels)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                 "special_tokens_map.json"):
        assert (tmp_path / "ck" / name).is_file(), name
    ck = load_checkpoint(tmp_path / "ck")
    assert ck.architecture == architecture and not ck.report.missing and not ck.report.unexpected
    assert ck.labels == (labels or [])
    ids, mask = batch(tok)
    for a, b in zip(outputs(model, ids, mask), outputs(ck.model, ids, mask)):
        assert torch.equal(a, b)


def test_pretraining_decoder_stays_tied_after_loading(tiny_tokenizer_dir, tmp_path):
    model, tok = build("BertForPreTraining", tiny_tokenizer_dir)
    save_checkpoint(tmp_path / "ck", model, "BertForPreTraining", tok)
    m = load_checkpoint(tmp_path / "ck").model
    assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight


def test_config_has_label_names(tiny_tokenizer_dir, tmp_path):
    model, tok = build("BertForSequenceClassification", tiny_tokenizer_dir)
    save_checkpoint(tmp_path / "ck", model, "BertForSequenceClassification", tok, LABELS)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert config["label2id"]["positive"] == 2 and config["architectures"] == ["BertForSequenceClassification"]


def test_base_checkpoint_initialises_a_task_head(minilm_dir):
    ck = load_checkpoint(minilm_dir, architecture="BertForTokenClassification", labels=["O", "B-PER", "I-PER"],
                         whole=False)  # as fine-tuning loads it
    assert ck.report.missing == ["classifier.weight", "classifier.bias"]
    assert sorted(ck.report.unexpected) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight"]
    assert ck.model.classifier.out_features == 3


def test_transformers_loads_bertcli_checkpoint_with_same_logits(tiny_tokenizer_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    for architecture in ("BertForSequenceClassification", "BertForTokenClassification", "BertForQuestionAnswering"):
        model, tok = build(architecture, tiny_tokenizer_dir)
        labels = LABELS if "Classification" in architecture else None
        save_checkpoint(tmp_path / architecture, model, architecture, tok, labels)
        hf = getattr(transformers, architecture).from_pretrained(tmp_path / architecture).eval()
        ids, mask = batch(tok)
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=mask)
        ours = outputs(model, ids, mask)
        theirs = [theirs.start_logits, theirs.end_logits] if architecture.endswith("Answering") else [theirs.logits]
        for a, b in zip(ours, theirs):
            keep = mask.bool() if a.dim() >= 2 and a.shape[:2] == mask.shape else slice(None)
            assert torch.allclose(a[keep], b[keep], atol=1e-5)
        if labels:
            assert hf.config.id2label[2] == "positive"


def test_transformers_loads_a_pretraining_checkpoint_with_the_same_outputs(tiny_tokenizer_dir, tmp_path):
    """BertForPreTraining: MLM logits (bertcli computes them at the positions asked for) and NSP logits."""
    transformers = pytest.importorskip("transformers")
    model, tok = build("BertForPreTraining", tiny_tokenizer_dir)
    save_checkpoint(tmp_path / "pre", model, "BertForPreTraining", tok)
    hf = transformers.BertForPreTraining.from_pretrained(tmp_path / "pre").eval()
    ids, mask = batch(tok)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask)
        mlm, nsp = model(ids, mask, mlm_positions=mask.bool())
    assert torch.allclose(mlm, theirs.prediction_logits[mask.bool()], atol=1e-5)
    assert torch.allclose(nsp, theirs.seq_relationship_logits, atol=1e-5)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if unpickled


def test_pickle_that_runs_code_is_refused(tiny_tokenizer_dir, tmp_path):
    model, tok = build("BertForSequenceClassification", tiny_tokenizer_dir)
    save_checkpoint(tmp_path / "ck", model, "BertForSequenceClassification", tok, LABELS)
    (tmp_path / "ck" / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "ck" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Payload(str(marker))}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "ck")
    assert not marker.exists()


def test_plain_pytorch_bin_loads(tiny_tokenizer_dir, tmp_path):
    model, tok = build("BertForSequenceClassification", tiny_tokenizer_dir)
    save_checkpoint(tmp_path / "ck", model, "BertForSequenceClassification", tok, LABELS)
    (tmp_path / "ck" / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "ck" / "pytorch_model.bin")
    ck = load_checkpoint(tmp_path / "ck")
    assert torch.equal(ck.model.classifier.weight, model.classifier.weight)


def test_a_weights_file_of_odd_tensors_is_refused_before_any_use(tiny_tokenizer_dir, tmp_path):
    """Tensors that weights_only=True unpickles but a model cannot hold: each named, never a traceback."""
    model, tok = build("BertForSequenceClassification", tiny_tokenizer_dir)
    save_checkpoint(tmp_path / "ck", model, "BertForSequenceClassification", tok, LABELS)
    (tmp_path / "ck" / "model.safetensors").unlink()
    state = model.state_dict()
    weight = "classifier.weight"
    for odd, message in [({**state, 1: torch.zeros(1)}, "tensors; a key is int, not a name"),
                         ({**state, "epoch": 3}, "'epoch' holds int (a training checkpoint? save its model's state_dict)"),
                         ({None: 5, **state}, "tensors; a key is NoneType, not a name"),
                         ([state[weight]], "expected a mapping of weight names to tensors, got list"),
                         ({**state, weight: state[weight].to("meta")}, "on meta"),
                         ({**state, weight: state[weight].to_sparse()}, "sparse_coo"),
                         ({**state, weight: state[weight].to(torch.complex64)}, "complex64"),
                         ({**state, weight: state[weight] > 0}, "torch.bool"),
                         ({**state, weight: state[weight].to(torch.int8)}, "weights stored as integers: "
                                                                            "classifier.weight (torch.int8)")]:
        torch.save(odd, tmp_path / "ck" / "pytorch_model.bin")
        with pytest.raises(CheckpointError, match=rf"(pytorch_model.bin|ck): .*{re.escape(message)}"):
            load_checkpoint(tmp_path / "ck")


def test_sizes_config_json_claims_beyond_its_weights_take_no_memory(tiny_tokenizer_dir, tmp_path, monkeypatch):
    """The shapes are compared on a model built on the meta device: no real one is built for a config.json
    that claims a million positions its weights do not have."""
    from bertcli import checkpoint

    model, tok = build("BertForSequenceClassification", tiny_tokenizer_dir)
    d = tmp_path / "ck"
    save_checkpoint(d, model, "BertForSequenceClassification", tok, LABELS)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1_000_000}))
    built, real = [], checkpoint.ARCHITECTURES["BertForSequenceClassification"]
    monkeypatch.setitem(checkpoint.ARCHITECTURES, "BertForSequenceClassification",
                        lambda cfg, n: built.append(torch.empty(0).device.type) or real(cfg, n))
    with pytest.raises(CheckpointError, match=r"position_embeddings.weight \(64, 32\) in the checkpoint, "
                                              r"\(1000000, 32\) in the model"):
        load_checkpoint(d)
    assert built == ["meta"]


def test_inconsistent_checkpoints_are_user_errors(tiny_tokenizer_dir, tmp_path):
    model, tok = build("BertForSequenceClassification", tiny_tokenizer_dir)
    d = tmp_path / "ck"
    save_checkpoint(d, model, "BertForSequenceClassification", tok, LABELS)
    config = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 7}))
    with pytest.raises(CheckpointError, match="disagree"):
        load_checkpoint(d)
    (d / "config.json").write_text(json.dumps({**config, "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="tokenizer has"):
        load_checkpoint(d)
    (d / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))  # of 2: a smaller model, silently
    for whole in (True, False):
        with pytest.raises(CheckpointError, match=r"the checkpoint holds encoder weights that a model of its config "
                                                  r"\(num_hidden_layers 1\) has no place for: bert.encoder.layer.1."):
            load_checkpoint(d, whole=whole)
    (d / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(d)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r"tokenizer.json: is a file, not a checkpoint directory"):
        load_checkpoint(d / "tokenizer.json")
    with pytest.raises(CheckpointError, match=r"tokenizer.json: is a file, not a tokenizer directory"):
        load_tokenizer(d / "tokenizer.json")


def test_weights_a_model_does_not_read_are_said(tiny_classifier_dir, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / "ck"
    shutil.copytree(tiny_classifier_dir, d)
    state = load_file(d / "model.safetensors")
    save_file({**state, "evil.weight": torch.zeros(2)}, d / "model.safetensors", metadata={"format": "pt"})
    load_checkpoint(d)
    assert f"{d}: weights its BertForSequenceClassification model does not read, left unused: evil.weight" \
        in capsys.readouterr().err


def test_with_dropout_sets_every_dropout_of_a_loaded_model_and_its_config(tiny_classifier_dir):
    from bertcli.checkpoint import with_dropout
    from bertcli.fastpath import Dropout
    from bertcli.model import BertSelfAttention

    ck = load_checkpoint(tiny_classifier_dir, architecture="BertForSequenceClassification")
    assert ck.config.hidden_dropout_prob == ck.config.attention_probs_dropout_prob == 0.0
    ids = torch.randint(5, 50, (2, 12))
    ck = with_dropout(ck, 0.5)
    drops = [m for m in ck.model.modules() if isinstance(m, Dropout)]
    attention = [m for m in ck.model.modules() if isinstance(m, BertSelfAttention)]
    assert len(drops) == 2 + 2 * len(attention) and all(m.p == 0.5 for m in drops)  # embeddings, head, 2 a layer
    assert attention and all(m.dropout_p == 0.5 for m in attention)
    assert ck.config.hidden_dropout_prob == ck.config.attention_probs_dropout_prob == 0.5
    assert ck.model.config is ck.config and ck.model.bert.config is ck.config  # what save_checkpoint writes
    model = ck.model.train()
    assert not torch.equal(model(ids), model(ids))
    ck = with_dropout(ck, 0.0)
    assert torch.equal(ck.model(ids), ck.model(ids))


def test_model_dropout_overrides_model_init_s_and_the_checkpoint_says_so(tiny_classifier_dir, tmp_path):
    from bertcli.jobs import finetune
    from bertcli.recipes import load_recipe
    from conftest import REVIEWS, write_recipe

    (tmp_path / "train.tsv").write_text(REVIEWS, encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                          {"max_steps": 1}, model={"init": str(tiny_classifier_dir)})
    for overrides, expected in [(["model.dropout=0.2"], 0.2), ([], 0.0)]:  # unset: the checkpoint's own (0.0), not 0.1
        out = tmp_path / f"out{expected}"
        finetune(load_recipe(recipe, overrides), out, resume=False, overwrite=False)
        config = json.loads((out / "config.json").read_text())
        assert config["hidden_dropout_prob"] == config["attention_probs_dropout_prob"] == expected


def test_fine_tuning_to_labels_of_its_own_does_not_read_the_old_heads_names(tiny_classifier_dir, tmp_path):
    """A checkpoint whose id2label names a label twice cannot answer (evaluate and predict refuse it), but a
    run that trains a new head on its own labels never reads those names."""
    import shutil

    from bertcli.errors import CheckpointError
    from bertcli.jobs import finetune
    from bertcli.recipes import load_recipe
    from conftest import write_recipe

    init = tmp_path / "init"
    shutil.copytree(tiny_classifier_dir, init)
    config = json.loads((init / "config.json").read_text())
    config["id2label"], config["label2id"] = {"0": "pos", "1": "pos"}, {"pos": 1}
    (init / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="id2label"):
        load_checkpoint(init)
    (tmp_path / "train.tsv").write_text("sentence\tlabel\ngood\tup\nbad\tdown\nfine\tflat\n", encoding="utf-8")
    recipe = write_recipe(tmp_path / "r.yaml", {"name": "classify"}, {"train": str(tmp_path / "train.tsv"),
                                                                      "max_seq_len": 16},
                          {"max_steps": 1}, model={"init": str(init)})
    finetune(load_recipe(recipe), tmp_path / "out", resume=False, overwrite=False)
    assert load_checkpoint(tmp_path / "out").labels == ["down", "flat", "up"]
