"""The from-scratch BERT reproduces Hugging Face's hidden states for the real MiniLM checkpoint."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from bertcli.checkpoint import load_checkpoint
from bertcli.tokenizer import load_tokenizer
from conftest import SHARED

GOLDEN = SHARED / "golden" / "minilm_hidden.npz"


@pytest.fixture(scope="module")
def golden():
    if not GOLDEN.is_file():
        pytest.skip(f"golden file {GOLDEN} is absent")
    return np.load(GOLDEN, allow_pickle=False)


def _ids(tokenizer, sentences, width):
    ids = np.zeros((len(sentences), width), dtype=np.int64)
    for row, enc in enumerate(tokenizer.encode_batch([str(s) for s in sentences])):
        ids[row, :len(enc.ids)] = enc.ids
    return ids


def test_tokenizer_json_reproduces_golden_ids(minilm_dir, golden):
    tok = load_tokenizer(minilm_dir)
    np.testing.assert_array_equal(_ids(tok, golden["sentences"], golden["input_ids"].shape[1]), golden["input_ids"])


def test_vocab_txt_alone_reproduces_golden_ids(minilm_dir, golden, tmp_path):
    shutil.copy(minilm_dir / "vocab.txt", tmp_path / "vocab.txt")
    tok = load_tokenizer(tmp_path)
    np.testing.assert_array_equal(_ids(tok, golden["sentences"], golden["input_ids"].shape[1]), golden["input_ids"])


def test_hidden_states_and_pooler_match_transformers(minilm_dir, golden):
    ck = load_checkpoint(minilm_dir)
    assert ck.architecture == "BertModel" and not ck.report.missing
    ids = _ids(ck.tokenizer, golden["sentences"], golden["input_ids"].shape[1])
    with torch.no_grad():
        hidden, pooled = ck.model(torch.from_numpy(ids), torch.from_numpy(golden["attention_mask"]),
                                  torch.from_numpy(golden["token_type_ids"]))
    real = golden["attention_mask"].astype(bool)
    assert np.abs(hidden.numpy()[real] - golden["last_hidden_state"][real]).max() < 1e-4
    assert np.abs(pooled.numpy() - golden["pooler_output"]).max() < 1e-4
