"""The training loop's contracts: the learning-rate schedule, gradient accumulation equal to one larger
batch, a time budget alone ending a run; and predict's --input and truncation flag."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from bertcli.errors import BertcliError
from bertcli.jobs import finetune
from bertcli.recipes import TrainConfig, load_recipe
from bertcli.data.batching import batch_order
from bertcli.train import epoch_batches, lr_at, plan_steps
from conftest import write_recipe

EIGHT = "sentence\tlabel\n" + "".join(f"{t}\t{label}\n" for t, label in [
    ("the film is wonderful", "pos"), ("a dull and boring plot", "neg"), ("i loved it", "pos"), ("i hated it", "neg"),
    ("truly a joy", "pos"), ("painfully slow", "neg"), ("the ending is superb", "pos"), ("awful lazy script", "neg")])


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    cfg = TrainConfig(lr=1e-3, warmup_ratio=0.1, max_steps=100)
    assert [lr_at(s, cfg, 100) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert [lr_at(s, cfg, 100) for s in (10, 55, 99)] == pytest.approx([1e-3, 5e-4, 1e-3 / 90])
    assert lr_at(100, cfg, 100) == 0.0
    assert lr_at(5, cfg, None) == 1e-3  # a time budget alone: constant
    assert lr_at(0, TrainConfig(lr=1e-3, warmup_ratio=0.0), 10) == 1e-3


def test_planned_steps_take_the_earlier_of_max_steps_and_epochs():
    assert plan_steps(TrainConfig(epochs=2.0, grad_accum=3), 10) == 8  # ceil(10 / 3) = 4 steps an epoch
    assert plan_steps(TrainConfig(epochs=2.0, max_steps=5), 10) == 5
    assert plan_steps(TrainConfig(epochs=0.5), 10) == 5
    assert plan_steps(TrainConfig(time_budget="1m"), 10) is None


def test_an_epoch_keeps_its_smaller_last_batch_when_every_process_gets_a_share():
    assert epoch_batches(17, 8, 1) == 3 and epoch_batches(16, 8, 1) == 2  # one process: every example
    assert epoch_batches(21, 8, 2) == 3  # a last batch of 5: 3 and 2 examples, as one process would see it
    assert epoch_batches(17, 8, 2) == 2  # a last batch of 1 cannot be shared: left out
    for world, n in ((2, 17), (3, 26), (4, 100)):
        kept = [b for b in batch_order([1 + i % 7 for i in range(n)], 8, seed=3) if len(b) >= world]
        assert len(kept) == epoch_batches(n, 8, world)
        assert all(len(b[rank::world]) for b in kept for rank in range(world))  # no process gets an empty share


def _train(tmp_path, tiny_tokenizer_dir, name, **train):
    (tmp_path / "train.tsv").write_text(EIGHT, encoding="utf-8")
    recipe = write_recipe(tmp_path / f"{name}.yaml", {"name": "classify"},
                          {"train": str(tmp_path / "train.tsv"), "max_seq_len": 16},
                          {"lr": 1e-3, **train}, tokenizer=tiny_tokenizer_dir)
    finetune(load_recipe(recipe), tmp_path / name, resume=False, overwrite=False)
    return load_file(str(tmp_path / name / "model.safetensors"))


def test_gradient_accumulation_equals_one_larger_batch(tmp_path, tiny_tokenizer_dir):
    """8 examples: one batch of 8, or two of 4 accumulated, make the same step (losses are divided by
    the whole step's count, not per micro-batch)."""
    one = _train(tmp_path, tiny_tokenizer_dir, "one", batch_size=8, grad_accum=1, max_steps=3)
    two = _train(tmp_path, tiny_tokenizer_dir, "two", batch_size=4, grad_accum=2, max_steps=3)
    start = _train(tmp_path, tiny_tokenizer_dir, "start", batch_size=8, grad_accum=1, max_steps=1, lr=1e-12)
    moved = [k for k in one if not torch.allclose(one[k], start[k], atol=1e-6)]
    assert len(moved) > 10  # the steps changed the weights...
    for k in one:  # ...and the same way both times
        assert torch.allclose(one[k], two[k], atol=2e-5), k
    with pytest.raises(BertcliError, match=r"train.grad_accum: 3, but an epoch has 2 batch\(es\) of 4 \(8 training "
                                           r"sequences\), and a step ends with its epoch: at most 2"):
        _train(tmp_path, tiny_tokenizer_dir, "three", batch_size=4, grad_accum=3, max_steps=1)  # a step of 8, not 12


@pytest.mark.slow
def test_compiled_layers_train_as_the_eager_ones(tmp_path, tiny_tokenizer_dir):
    """train.compile: the encoder layers run through torch.compile (inductor's C++ kernels here) with
    dynamic shapes; the weights after three steps equal eager training's, and the checkpoint's names
    are unchanged (it loads as an eager model)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # nothing compiled earlier in this process is reused
    counters.clear()
    eager = _train(tmp_path, tiny_tokenizer_dir, "eager", batch_size=4, max_steps=3)
    assert not counters["stats"]["unique_graphs"]
    compiled = _train(tmp_path, tiny_tokenizer_dir, "compiled", batch_size=4, max_steps=3, compile=True)
    assert counters["stats"]["unique_graphs"] >= 1  # the layers did run compiled
    assert compiled.keys() == eager.keys()
    for k in eager:
        assert torch.allclose(compiled[k], eager[k], atol=1e-4), k
    log = (tmp_path / "compiled" / "log.jsonl").read_text()
    assert '"step": 3' in log


def test_a_compiler_that_fails_ends_the_run_with_one_message(tmp_path, tiny_tokenizer_dir, monkeypatch):
    """Without a working C++ compiler (here: one that does not exist) the run stops with exit 2 and
    says which setting to change, not with inductor's traceback."""
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "force_disable_caches", True)  # no kernel compiled before, on disk
    torch._dynamo.reset()  # nor in this process (an earlier test's compiled layers would be reused)
    with pytest.raises(BertcliError, match="train.compile: torch.compile failed.*set train.compile: false"):
        _train(tmp_path, tiny_tokenizer_dir, "broken", batch_size=4, max_steps=1, compile=True)
    torch._dynamo.reset()


@pytest.mark.slow
def test_time_budget_alone_ends_a_run(tmp_path, tiny_tokenizer_dir):
    _train(tmp_path, tiny_tokenizer_dir, "timed", batch_size=2, time_budget="2s", log_every=1)
    log = [json.loads(line) for line in (tmp_path / "timed" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in log if "loss" in r]
    assert steps and steps == list(range(1, len(steps) + 1))
    assert all(r["lr"] == 1e-3 for r in log if "lr" in r)  # no planned end: no decay
    assert (tmp_path / "timed" / "resume.pt").is_file()


@pytest.mark.slow
def test_predict_reads_input_file_and_flags_truncation(tmp_path, tiny_classifier_dir, cli):
    long = " ".join(["wonderful"] * 40)  # past the model's 16 tokens
    (tmp_path / "in.txt").write_text(f"i loved it\n{long}\n", encoding="utf-8")
    from_file = cli("predict", str(tiny_classifier_dir), "--input", str(tmp_path / "in.txt"))
    from_stdin = cli("predict", str(tiny_classifier_dir), stdin=(tmp_path / "in.txt").read_bytes())
    assert from_file.returncode == 0, from_file.stderr
    assert from_file.stdout == from_stdin.stdout
    short, truncated = [json.loads(line) for line in from_file.stdout.decode().splitlines()]
    assert "truncated" not in short and truncated["truncated"] is True
    assert set(truncated["scores"]) == {"neg", "pos"}


def test_batches_cover_every_example_once_and_group_by_length_when_asked():
    import random

    from bertcli.data.batching import batch_order

    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(1000)]
    spread = {}
    for group in (50, 0):
        batches = batch_order(lengths, 8, seed=3, group=group)
        assert sorted(i for b in batches for i in b) == list(range(1000))
        listed = [b.tolist() for b in batches]
        assert [b.tolist() for b in batch_order(lengths, 8, seed=3, group=group)] == listed
        assert [b.tolist() for b in batch_order(lengths, 8, seed=4, group=group)] != listed
        spread[group] = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
    assert spread[50] < spread[0] / 10  # grouped: like lengths together; train.group_by_length=false: a plain shuffle
    assert TrainConfig().group_by_length is True
