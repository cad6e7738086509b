"""The model's own pieces that the golden test (eval mode) does not reach: dropout and the
attention path used in training."""

from __future__ import annotations

import pytest
import torch

from bertcli.model import BertConfig, BertModel, BertSelfAttention, Padding, dropout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_drops_at_rate_p_and_keeps_the_expectation(dtype):
    torch.manual_seed(0)
    x = torch.ones(1000, 1001, dtype=dtype)  # an odd size: the mask is cut from whole 64-bit draws
    y = dropout(x, 0.1)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.002
    assert abs(y.float().mean().item() - 1.0) < 0.005
    kept = y[y != 0].float()
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.9), rtol=1e-2)


def test_dropout_masks_differ_across_lanes_and_calls_and_follow_the_seed():
    x = torch.ones(64, 64)
    torch.manual_seed(1)
    a, b = dropout(x, 0.5), dropout(x, 0.5)
    torch.manual_seed(1)
    assert torch.equal(dropout(x, 0.5), a)
    assert not torch.equal(a, b)
    for lane in range(4):  # each 16-bit piece of a 64-bit draw is used; none may be stuck
        share = (a.flatten()[lane::4] == 0).float().mean().item()
        assert 0.4 < share < 0.6


def test_dropout_edges_and_gradient():
    x = torch.randn(8, 8, requires_grad=True)
    assert dropout(x, 0.0) is x
    assert torch.count_nonzero(dropout(x, 1.0)) == 0
    torch.manual_seed(2)
    y = dropout(x, 0.3)
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)  # gradient flows through kept elements only


def test_training_attention_matches_sdpa_when_nothing_is_dropped():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=4, attention_probs_dropout_prob=1e-9)  # rounds to no drop
    attention = BertSelfAttention(cfg)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    pad = Padding(mask)
    x = torch.randn(int(mask.sum()), 32)  # packed (R, H)
    with torch.no_grad():
        trained = attention.train()(x, pad)
        served = attention.eval()(x, pad)
    assert trained.shape == x.shape
    assert torch.allclose(trained, served, atol=1e-6)


def test_padded_batch_equals_each_sequence_alone():
    """Removing the padding inside the encoder changes nothing at the real tokens: outputs and
    gradients of a padded batch equal those of each sequence run on its own, unpadded."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertModel(cfg).eval()
    lengths = [7, 4, 1]
    ids = torch.randint(1, 50, (3, 7))
    types = torch.randint(0, 2, (3, 7))
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    hidden, pooled = model(ids * mask, mask, types * mask)
    assert (hidden[~mask.bool()] == 0).all()
    (hidden[mask.bool()].square().sum() + pooled.square().sum()).backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0
    for row, n in enumerate(lengths):
        h, p = model(ids[row:row + 1, :n], torch.ones(1, n, dtype=torch.long), types[row:row + 1, :n])
        assert torch.allclose(h[0], hidden[row, :n], atol=1e-5)
        assert torch.allclose(p[0], pooled[row], atol=1e-5)
        total = total + h.square().sum() + p.square().sum()
    total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, batched[name], atol=1e-4), name
