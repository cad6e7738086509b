"""The model's own pieces that the golden test (eval mode) does not reach: dropout and the
attention path used in training."""

from __future__ import annotations

import pytest
import torch

from bertcli.fastpath import ROWS, Padding, dropout
from bertcli.model import BertConfig, BertForPreTraining, BertModel, BertSelfAttention


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
    x = pad.pack(torch.randn(3, 7, 32))  # packed (rows, H)
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


@pytest.mark.parametrize("train", [False, True])
def test_last_layer_at_needed_positions_only_equals_the_full_trunk(train):
    """With `needed`, the last layer queries only those positions (and [CLS] for the pooler):
    their hidden states, the pooled output and every gradient equal the full computation's."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=1e-9, attention_probs_dropout_prob=1e-9)  # both round to no drop
    model = BertModel(cfg).train(train)  # training runs the explicit attention, eval SDPA
    ids = torch.randint(1, 50, (3, 7))
    mask = (torch.arange(7)[None, :] < torch.tensor([7, 5, 3])[:, None]).long()
    needed = torch.zeros(3, 7, dtype=torch.bool)
    needed[0, [2, 3, 6]] = True
    needed[1, 4] = True  # row 2: only [CLS], added for the pooler
    needed[2, 5] = True  # padding: never computed, comes back as zero
    full, full_pooled = model(ids * mask, mask)
    (full[needed & mask.bool()].square().sum() + full_pooled.square().sum()).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    hidden, pooled = model(ids * mask, mask, needed=needed)
    kept = needed & mask.bool()
    kept[:, 0] = True
    assert torch.allclose(hidden[kept], full[kept], atol=1e-5)
    assert (hidden[~kept] == 0).all()
    assert torch.allclose(pooled, full_pooled, atol=1e-5)
    (hidden[needed & mask.bool()].square().sum() + pooled.square().sum()).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-5), name


def test_row_counts_are_rounded_so_that_batches_of_similar_size_share_matmul_shapes():
    """Every matmul of a padded batch sees a multiple of ROWS rows: the packed real tokens, the
    last layer's queried positions and the MLM head's masked positions. Batches whose counts
    differ a little then share shapes (and oneDNN's cached kernels); the answers do not change."""
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    model = BertForPreTraining(cfg).eval()
    rows: dict[str, list[int]] = {}
    watched = {"first layer": model.bert.encoder.layer[0].intermediate.dense,
               "last layer": model.bert.encoder.layer[-1].intermediate.dense,
               "MLM head": model.cls.predictions.transform.dense}
    for name, module in watched.items():
        module.register_forward_hook(lambda m, args, out, name=name: rows.setdefault(name, []).append(args[0].shape[0]))
    for lengths, masked in (([7, 5, 3], [1, 2, 5]), ([7, 6, 1], [2, 3])):  # 15 and 14 real tokens, 3 and 2 masked
        ids = torch.randint(1, 50, (3, 7))
        mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
        positions = torch.zeros(3, 7, dtype=torch.bool)
        positions[0, masked] = True
        mlm, _ = model(ids * mask, mask, mlm_positions=positions)
        hidden, _ = model.bert(ids * mask, mask)
        assert mlm.shape == (len(masked), 50)
        assert torch.allclose(mlm, model.cls.predictions(hidden[positions]), atol=1e-5)
    assert rows["first layer"] == [ROWS, ROWS, ROWS, ROWS]  # 15, 14 (and again in the plain trunk) -> 16
    assert rows["last layer"] == [ROWS, ROWS, ROWS, ROWS]  # 3 masked + 3 [CLS], 2 + 3; and the plain trunk
    assert rows["MLM head"] == [ROWS, 3, ROWS, 2]  # bertcli's forward, then the check above


def pretraining_grads(model, ids, mask, positions) -> dict[str, torch.Tensor]:
    mlm, sentence = model(ids, mask, None, mlm_positions=positions)
    (mlm.float().square().mean() + sentence.float().square().mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_word_embedding_gradient_added_in_place_equals_autograd(monkeypatch):
    """The tied word embeddings' gradient, which WordLookup and TiedDecoder add into one kept
    buffer, equals plain autograd's; the padding row gets none; the buffer is reused, from zero,
    after zero_grad(set_to_none=True), and accumulates across backward passes without it."""
    from bertcli import model as bert

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = bert.BertForPreTraining(cfg)
    ids = torch.randint(1, 60, (3, 9))
    ids[0, 3] = cfg.pad_token_id  # a [PAD] id at a real position: nn.Embedding gives its row no gradient
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    positions = torch.rand(3, 9) < 0.4
    ours = pretraining_grads(model, ids, mask, positions)
    weight = model.bert.embeddings.word_embeddings.weight
    kept = weight._kept_grad
    again = pretraining_grads(model, ids, mask, positions)
    assert weight._kept_grad is kept  # reused, not reallocated
    assert torch.equal(again["bert.embeddings.word_embeddings.weight"], ours["bert.embeddings.word_embeddings.weight"])
    assert (ours["bert.embeddings.word_embeddings.weight"][cfg.pad_token_id] == 0).all()

    monkeypatch.setattr(bert.WordLookup, "apply", lambda i, w, p: torch.nn.functional.embedding(i, w, p))
    monkeypatch.setattr(bert.TiedDecoder, "apply", lambda x, w, low: x @ w.t())
    reference = pretraining_grads(model, ids, mask, positions)
    for name, grad in reference.items():
        assert torch.allclose(ours[name], grad, atol=1e-6), name

    monkeypatch.undo()
    mlm, _ = model(ids, mask, None, mlm_positions=positions)
    mlm.sum().backward()
    once = weight.grad.clone()
    mlm, _ = model(ids, mask, None, mlm_positions=positions)
    mlm.sum().backward()  # no zero_grad in between: gradient accumulation
    assert torch.allclose(weight.grad, 2 * once, atol=1e-6)


def test_tied_decoder_under_bf16_autocast_keeps_a_low_precision_copy():
    torch.manual_seed(0)
    from bertcli.model import BertForPreTraining

    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    model = BertForPreTraining(cfg).eval()
    ids = torch.randint(1, 60, (2, 5))
    head = model.cls.predictions
    with torch.inference_mode():
        plain, _ = model(ids)
        with torch.autocast("cpu", torch.bfloat16):
            served, _ = model(ids)
    assert head.low is None  # serving casts a temporary; an inference tensor could not be trained with
    with torch.autocast("cpu", torch.bfloat16):
        trained, _ = model(ids)
    assert head.low is not None and head.low.dtype == torch.bfloat16
    assert torch.equal(head.low, head.decoder.weight.to(torch.bfloat16))
    assert torch.allclose(trained.float(), plain, atol=0.05) and torch.equal(trained, served)
