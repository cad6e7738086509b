"""The shipped recipes run as shipped, from the project root: the README's quick start."""

from __future__ import annotations

import pytest

import json

from conftest import ROOT, minilm_path


@pytest.mark.slow
def test_quick_start_sentiment_recipe_runs(tmp_path, cli):
    minilm_path()
    done = cli("finetune", "recipes/sentiment-reviews.yaml", "--out", str(tmp_path / "run"),
               "--set", "train.max_steps=4", cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    done = cli("predict", str(tmp_path / "run"), stdin=b"the plot is wonderful .\n", cwd=ROOT)
    assert json.loads(done.stdout)["label"] in ("negative", "positive")


@pytest.mark.slow
def test_quick_start_pretraining_then_finetuning_runs(tmp_path, cli):
    short = ["--set", "train.max_steps=3", "--set", "train.eval_every=2"]
    done = cli("tokenize", "train", "--corpus", "recipes/data/tiny-corpus.txt", "--out", str(tmp_path / "tok"),
               "--vocab-size", "2000", cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()
    done = cli("pretrain", "recipes/pretrain-tiny.yaml", "--out", str(tmp_path / "pt"), "--set",
               f"tokenizer={tmp_path / 'tok'}", *short, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    done = cli("finetune", "recipes/sentiment-reviews.yaml", "--out", str(tmp_path / "ft"), "--set",
               f"model.init={tmp_path / 'pt'}", "--set", "train.max_steps=3", cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert "eval_accuracy" in json.loads((tmp_path / "ft" / "metrics.json").read_text())
