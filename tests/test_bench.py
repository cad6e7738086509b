"""The pretraining bench's work accounting (bench/pretrain_throughput.py: matmul_flops) against
the matmuls each side really runs, counted by torch's FlopCounterMode over a training step."""

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from bertcli.fastpath import ROWS
from bertcli.model import BertConfig, BertForPreTraining

BENCH = Path(__file__).resolve().parents[1] / "bench" / "pretrain_throughput.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("pretrain_throughput", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def batch(cfg: BertConfig) -> dict:
    """Three sequences of 20, 13 and 6 real tokens padded to 20, a few masked positions each."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([20, 13, 6])
    mask = (torch.arange(20)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, cfg.vocab_size, (3, 20), generator=g) * mask
    labels = torch.full((3, 20), -100)
    for row, cols in enumerate(([3, 7, 11, 19], [1, 12], [4])):
        labels[row, cols] = ids[row, cols]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "mlm_labels": labels, "sentence_labels": torch.tensor([0, 1, 0])}


def counted(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def test_matmul_flops_counts_the_matmuls_each_side_runs():
    transformers = pytest.importorskip("transformers")
    bench = load_bench()
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    b = batch(cfg)
    expected = bench.matmul_flops(cfg, b)
    h, size = cfg.hidden_size, b["attention_mask"].shape[0]
    left_out = 3 * (size * 2 * h * h + size * 2 * h * 2)  # pooler and sentence head, training

    model = BertForPreTraining(cfg).train()
    positions = b["mlm_labels"] != -100

    def ours():
        mlm, nsp = model(b["input_ids"], b["attention_mask"], b["token_type_ids"], mlm_positions=positions)
        (F.cross_entropy(mlm, b["mlm_labels"][positions]) + F.cross_entropy(nsp, b["sentence_labels"])).backward()

    # The tied decoder adds its weight gradient with an in-place addmm_, which FlopCounterMode does not count.
    rows = -(-int(positions.sum()) // ROWS) * ROWS
    assert counted(ours) == expected["bertcli"] + left_out - 2 * rows * h * cfg.vocab_size

    hf_cfg = transformers.BertConfig(vocab_size=cfg.vocab_size, hidden_size=h, num_hidden_layers=cfg.num_hidden_layers,
                                     num_attention_heads=cfg.num_attention_heads, intermediate_size=cfg.intermediate_size)
    hf = transformers.BertForPreTraining(hf_cfg).train()

    def theirs():
        hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
           labels=b["mlm_labels"], next_sentence_label=b["sentence_labels"]).loss.backward()

    assert counted(theirs) == expected["transformers"] + left_out
    assert expected["transformers"] > expected["bertcli"]


def test_the_gpu_checks_mfu_numerator_is_the_matmul_work_transformers_does():
    """bench/gpu_check.py's flops_per_token (the standard formula: 6 x parameters + attention) against
    FlopCounterMode's count of a transformers training step on a batch without padding (the pooler and
    the sentence head, which the formula leaves out, are subtracted)."""
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH.parent / "gpu_check.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = dict(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    (b,) = bench.make_batches(1, 4, 24, cfg["vocab_size"])
    b["attention_mask"].fill_(1)
    hf = transformers.BertForPreTraining(transformers.BertConfig(**cfg)).train()

    def step():
        hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], token_type_ids=b["token_type_ids"],
           labels=b["mlm_labels"], next_sentence_label=b["sentence_labels"]).loss.backward()

    h, rows = cfg["hidden_size"], 4
    left_out = 3 * (rows * 2 * h * h + rows * 2 * h * 2)  # pooler and sentence head, training
    assert counted(step) == bench.flops_per_token(cfg, 24) * 4 * 24 + left_out
    assert 0.1 < float((b["mlm_labels"] != -100).float().mean()) < 0.2  # about 15% of the tokens masked
