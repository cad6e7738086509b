"""Which attention kernel runs where (model.attention_kernel), and the varlen path's bookkeeping.

The flash kernels behind varlen attention and SDPA's dropout run on CUDA only; bench/gpu_check.sh
times them there. Here, on the CPU, the varlen path runs with a reference kernel written with SDPA
one sequence at a time: the packed rows, their offsets (`cu`), the longest lengths, the last layer's
selected queries and the rounding rows must then give what the padded path gives."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bertcli.model as model_module
from bertcli.fastpath import ROWS
from bertcli.model import BertConfig, BertForPreTraining, BertModel, BertSelfAttention, attention_kernel

BF16, FP32 = torch.bfloat16, torch.float32


@pytest.mark.parametrize("device, training, p, layout, dtype, kernel", [
    ("cpu", True, 0.1, "packed", FP32, "written"),  # SDPA's CPU kernels cannot drop out
    ("cpu", True, 0.1, "padded", BF16, "written"),
    ("cpu", True, 0.0, "packed", BF16, "sdpa"),
    ("cpu", False, 0.1, "packed", BF16, "sdpa"),
    ("cpu", False, 0.1, "exported", FP32, "exported"),
    ("cpu", True, 0.1, "exported", FP32, "written"),  # a padded model in training still drops out
    ("cuda", True, 0.1, "packed", BF16, "sdpa"),  # its flash / memory-efficient kernels drop out themselves
    ("cuda", True, 0.1, "padded", BF16, "sdpa"),
    ("cuda", True, 0.0, "packed", BF16, "varlen"),  # MosaicBERT's, ModernBERT's and Cramming's setting
    ("cuda", False, 0.1, "packed", torch.float16, "varlen"),  # inference: nothing to drop
    ("cuda", False, 0.1, "packed", FP32, "sdpa"),  # flash has no fp32
    ("cuda", False, 0.0, "padded", BF16, "sdpa"),  # no padding to skip
    ("cuda", False, 0.0, "exported", BF16, "exported"),
])
def test_the_kernel_chosen_for_each_device_and_setting(monkeypatch, device, training, p, layout, dtype, kernel):
    monkeypatch.setattr(model_module, "varlen_attn", object())  # as where PyTorch has it
    assert attention_kernel(device, training, p, layout, dtype, 64) == kernel


@pytest.mark.parametrize("head_dim, flash", [(26, True), (264, True), (64, False)])
def test_varlen_only_where_its_kernel_runs(monkeypatch, head_dim, flash):
    """Flash attention's varlen kernel takes head sizes that are multiples of 8 up to 256 (TinyBERT's
    312 / 12 = 26 is not) and needs an Ampere or later GPU; elsewhere SDPA, which pads, runs."""
    monkeypatch.setattr(model_module, "varlen_attn", object())
    assert attention_kernel("cuda", False, 0.0, "packed", BF16, head_dim, flash=flash) == "sdpa"


def test_without_varlen_in_this_pytorch_cuda_falls_back_to_sdpa(monkeypatch):
    monkeypatch.setattr(model_module, "varlen_attn", None)
    assert attention_kernel("cuda", False, 0.0, "packed", BF16, 64) == "sdpa"


calls: list[tuple[int, int, int, int]] = []


def reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k):
    """varlen_attn's contract, one sequence at a time with SDPA; checks the arguments it is given."""
    assert q.dim() == k.dim() == v.dim() == 3 and cu_q.dtype == cu_k.dtype == torch.int32
    assert q.shape[0] == int(cu_q[-1]) and k.shape[0] == v.shape[0] == int(cu_k[-1])  # no rounding rows
    assert max_q == int(cu_q.diff().max()) and max_k == int(cu_k.diff().max())
    calls.append((q.shape[0], k.shape[0], max_q, max_k))
    out = []
    for b in range(len(cu_q) - 1):
        qs, ks, vs = (t[int(c[b]):int(c[b + 1])].transpose(0, 1) for t, c in ((q, cu_q), (k, cu_k), (v, cu_k)))
        out.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1))  # (Lq, N, D)
    return torch.cat(out)


@pytest.fixture
def varlen_on_cpu(monkeypatch):
    """Packed batches take the varlen path on the CPU, through the reference kernel."""
    chosen = attention_kernel

    def kernel(device, training, p, layout, *rest, **flash):
        return "varlen" if layout == "packed" and not (training and p > 0) else chosen(device, training, p, layout, *rest)

    calls.clear()
    monkeypatch.setattr(model_module, "varlen_attn", reference_varlen)
    monkeypatch.setattr(model_module, "attention_kernel", kernel)


def outputs_and_grads(model, *args, **kwargs):
    model.zero_grad()
    out = model(*args, **kwargs)
    parts = [t for t in out if t is not None]
    sum(t.float().square().sum() for t in parts).backward()
    return [t.detach() for t in parts], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(a, b):
    (outs_a, grads_a), (outs_b, grads_b) = a, b
    for x, y in zip(outs_a, outs_b):
        assert torch.allclose(x, y, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-4), name


def small() -> BertConfig:
    return BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def test_varlen_on_packed_rows_equals_padded_attention(monkeypatch):
    torch.manual_seed(0)
    model = BertModel(small()).train()
    lengths = [9, 4, 1, 6]  # 20 real tokens: 12 rounding rows, which varlen must leave out and put back
    ids = torch.randint(1, 60, (4, 9))
    mask = (torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]).long()
    padded = outputs_and_grads(model, ids * mask, mask)
    with monkeypatch.context() as m:
        m.setattr(model_module, "varlen_attn", reference_varlen)
        m.setattr(model_module, "attention_kernel", lambda *a, **k: "varlen" if a[3] == "packed" else "sdpa")
        calls.clear()
        varlen = outputs_and_grads(model, ids * mask, mask)
    assert calls == [(20, 20, 9, 9)] * 2  # both layers, on the real tokens
    assert_same(varlen, padded)


def test_varlen_for_the_last_layers_selected_queries_equals_the_full_trunk(varlen_on_cpu, monkeypatch):
    """Pretraining: the last layer queries the masked positions and [CLS] only, with their own offsets."""
    torch.manual_seed(0)
    model = BertForPreTraining(small())
    lengths = [7, 5, 3]
    ids = torch.randint(1, 60, (3, 7))
    mask = (torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]).long()
    positions = torch.zeros(3, 7, dtype=torch.bool)
    positions[0, [2, 3, 6]] = True
    positions[1, 4] = True  # row 2: [CLS] alone
    varlen = outputs_and_grads(model.train(), ids * mask, mask, mlm_positions=positions)
    assert calls == [(15, 15, 7, 7), (4 + 2 + 1, 15, 4, 7)]  # layer 2: [CLS] and the masked, 4, 2 and 1
    monkeypatch.setattr(model_module, "attention_kernel", lambda *a, **k: "sdpa")
    assert_same(varlen, outputs_and_grads(model, ids * mask, mask, mlm_positions=positions))


def test_varlen_keeps_the_rounded_row_shapes(varlen_on_cpu):
    """The rows past the real tokens come back as copies of the first, so the matmuls after attention
    keep their multiple of ROWS."""
    torch.manual_seed(0)
    seen = []
    model = BertModel(small()).eval()
    model.encoder.layer[0].attention.output.dense.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    ids = torch.randint(1, 60, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    with torch.no_grad():
        model(ids, mask)
    assert seen == [ROWS]


def test_sdpa_drops_out_in_training_only(monkeypatch):
    """The CUDA training path (SDPA with dropout_p), run here through SDPA's CPU fallback."""
    monkeypatch.setattr(model_module, "attention_kernel", lambda *a, **k: "sdpa")
    torch.manual_seed(0)
    attention = BertSelfAttention(BertConfig(hidden_size=32, num_attention_heads=4, attention_probs_dropout_prob=0.5))
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        served = attention.eval()(x, None)
        again = attention.eval()(x, None)
        trained = attention.train()(x, None)
    assert torch.equal(served, again)
    assert not torch.allclose(trained, served, atol=1e-3)
