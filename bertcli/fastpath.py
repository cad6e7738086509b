"""The CPU fast path of model.py: what makes a training step cheaper without changing its math.

Padding is removed inside the encoder: a batch with padding runs its linear layers, FFN and
LayerNorms on the R real tokens only, packed as (R, H), and is laid out as (B, T, H) only for
attention. Pretraining batches from WikiText-2 are ~28% padding, all of which was paid for in
every matmul.

Packed row counts (real tokens, and the positions below) are rounded up to a multiple of 16
with copies of a real row that are never read back (`rounded`), so that batches of similar size
share matmul shapes.

When the caller reads only some positions of the last hidden states (pretraining: the ~15%
masked tokens and [CLS]), the last layer computes its keys and values at every token but its
queries, attention output, FFN and LayerNorms at those positions only (`Selection`).

The tied word-embedding matrix gets its gradient added in place into one buffer kept across
steps (`grad_buffer`, `WordLookup`, `TiedDecoder`), so the heap settles under the allocator
policy (allocator.py). Dropout masks are drawn 16 bits per element (`dropout`).
Only torch is imported here, as in model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def dropout(x: Tensor, p: float) -> Tensor:
    """Inverted dropout, with the mask drawn 16 bits per element, four elements per 64-bit random
    number: F.dropout draws one random number per element, which made it 5x slower on CPU and
    ~8% of a BERT-base training step. An element is dropped with probability round(p * 65536) / 65536
    (p to within 1e-5) and the rest are scaled to keep the expectation exactly."""
    cut = round(p * 65536)
    if cut == 0:
        return x
    if cut >= 65536:
        return torch.zeros_like(x)
    bits = torch.randint(-2**63, 2**63 - 1, ((x.numel() + 3) // 4,), dtype=torch.int64, device=x.device)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= cut - 32768
    return torch.where(keep, x * (65536 / (65536 - cut)), 0)


ROWS = 16  # packed row counts are rounded up to a multiple of this (see `rounded`)


def rounded(index: Tensor) -> Tensor:
    """`index` (n,), with its first entry repeated to make the length a multiple of ROWS.

    Packed tensors have one row per real token, a count that changes with every batch. oneDNN
    builds and caches a kernel per matmul shape (up to 1,024, then it evicts), so nearly every
    batch built new kernels, and the cache's churn left long-lived blocks all through the heap,
    which kept growing under the allocator policy (bertcli/allocator.py): over 270 steps of the
    tiny pretraining shape the heap reached 2.3 GB and was still growing, for 0.7 GB in use.
    With rounded counts the kernels are reused: the heap settled at 1.1 GB by step 120 and
    the page faults stopped. The extra rows copy a real one and are never read back, so they
    get no gradient; they cost at most 15 rows of work per matmul. The result is never `index`
    itself, even with no rows to add: torch.compile guards on which tensors alias, and would compile
    the layers again for every batch whose count happened to be a multiple of ROWS."""
    extra = -index.numel() % ROWS
    return torch.cat([index, index[:1].expand(extra)]) if index.numel() else index  # a new tensor: see above


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device`. A CUDA copy is made from pinned memory without waiting: a copy from
    pageable memory waits for everything queued before it."""
    if t.device.type != "cpu" or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


_FLASH: dict[torch.device, bool] = {}


def flash_gpu(device: torch.device) -> bool:
    """Whether `device` runs flash attention: a CUDA GPU of compute capability 8.0 (Ampere) or later."""
    if device.type != "cuda":
        return False
    if device not in _FLASH:
        _FLASH[device] = (torch.backends.cuda.is_flash_attention_available()
                          and torch.cuda.get_device_capability(device)[0] >= 8)
    return _FLASH[device]


class Padding:
    """Where a padded batch's real tokens are: `kept` indexes the flattened (B * T) positions.
    `gather` makes the packed rows: the R real tokens, then copies of the first (`rounded`).
    A row's tokens are consecutive packed rows: row b's are `cu[b]` to `cu[b + 1]` (int32, (B + 1,)),
    as varlen attention reads them, and `longest` is the longest row.

    `host` is the mask on the CPU (on a CPU, the mask itself): the indices are computed there and
    copied to `device`, so that building them makes the accelerator wait only for the mask's copy."""

    def __init__(self, host: Tensor, device: torch.device | None = None):
        device = device or host.device
        host = host.cpu()
        self.shape = host.shape  # (B, T)
        lengths = host.sum(1)  # (B,)
        self.count = int(lengths.sum())  # R
        self.longest = int(lengths.max()) if host.shape[0] else 0
        self.kept = to_device(host.reshape(-1).nonzero().squeeze(1), device)  # (R,)
        self.gather = rounded(self.kept)  # (rows,)
        self.cu = to_device(F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32), device)  # (B + 1,)
        self.mask = to_device(host[:, None, None, :].bool(), device)  # (B, 1, 1, T): True = attend to this key
        self.flash = flash_gpu(device)  # varlen attention can run on these rows (model.attention_kernel)

    def pack(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (rows, ...)"""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.gather)

    def unpack(self, x: Tensor) -> Tensor:
        """(rows, ...) -> (B, T, ...), zeros at the padding."""
        full = x.new_zeros(self.shape.numel(), *x.shape[1:])
        return full.index_copy(0, self.kept, x[:self.kept.numel()]).view(*self.shape, *x.shape[1:])


class Masked:
    """A padded batch kept padded: the encoder's layers run on (B, T, H) and attention reads the
    mask. It is the path of an exported graph (bertcli export), whose shapes follow its inputs'
    and which runs where packing by `nonzero` would cost more than the padding it saves."""

    def __init__(self, attention_mask: Tensor):
        self.mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T), as Padding's
        self.bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # added to the scores: BERT's own form

    def pack(self, x: Tensor) -> Tensor:
        return x

    def unpack(self, x: Tensor) -> Tensor:
        return x


def grad_buffer(weight: Tensor) -> Tensor:
    """weight.grad, to add into in place. When it is None (zero_grad(set_to_none=True)), it becomes
    a zeroed buffer that stays with the parameter across steps: autograd would otherwise hand the
    word embeddings a fresh dense (V, H) gradient every step (94 MB in fp32 at BERT's vocabulary),
    plus a second one to add from the other use of the tied matrix. Blocks that size are mmapped
    and faulted in afresh on every allocation, or fragment the heap (bertcli/allocator.py)."""
    if weight.grad is None:
        kept = getattr(weight, "_kept_grad", None)
        if kept is None or (kept.dtype, kept.shape, kept.device) != (weight.dtype, weight.shape, weight.device):
            kept = torch.zeros_like(weight)
            weight._kept_grad = kept
        else:
            kept.zero_()
        weight.grad = kept
    return weight.grad


class WordLookup(torch.autograd.Function):
    """F.embedding whose backward adds the looked-up rows' gradients into grad_buffer(weight)
    instead of returning a dense (V, H) gradient to autograd."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, padding_idx: int | None) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight, ctx.padding_idx = weight, padding_idx
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None, None]:
        (ids,) = ctx.saved_tensors
        if ctx.weight.requires_grad:
            ids, grad = ids.reshape(-1), grad.reshape(-1, grad.shape[-1])
            if ctx.padding_idx is not None:  # nn.Embedding leaves the padding row's gradient at zero
                keep = ids != ctx.padding_idx
                ids, grad = ids[keep], grad[keep]
            grad_buffer(ctx.weight).index_add_(0, ids, grad.to(ctx.weight.dtype))
        return None, None, None


class TiedDecoder(torch.autograd.Function):
    """x @ weight.T, computed with `low`, weight's copy in x's lower precision, when given. The
    weight gradient is added into grad_buffer(weight) in weight's own precision."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, low: Tensor | None) -> Tensor:
        w = weight if low is None else low
        ctx.save_for_backward(x, w)
        ctx.weight = weight
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        x, w = ctx.saved_tensors
        if ctx.weight.requires_grad:
            dtype = ctx.weight.dtype
            grad_buffer(ctx.weight).addmm_(grad.t().to(dtype), x.to(dtype))
        return grad @ w, None, None


class Selection:
    """The positions of a padded batch whose last hidden states are read: `rows` indexes the
    packed real tokens (S of them, `rounded` as packed rows are), `queries` lays them out per
    batch row, (S,) <-> (B, Q), for attention, and `out` places them back at their (B, T)
    positions."""

    def __init__(self, needed: Tensor, attention_mask: Tensor, device: torch.device | None = None):
        """`needed` and `attention_mask` on the host, as Padding's `host`."""
        device = device or needed.device
        needed, attention_mask = needed.cpu(), attention_mask.cpu()
        needed = needed.bool() & attention_mask.bool()  # (B, T)
        self.rows = rounded(to_device((attention_mask.reshape(-1).cumsum(0) - 1)[needed.reshape(-1)], device))  # (S, rounded up)
        counts = needed.sum(1)  # (B,)
        self.queries = Padding(torch.arange(int(counts.max()))[None, :] < counts[:, None], device)
        self.out = Padding(needed, device)


class Dropout(nn.Module):
    """nn.Dropout's role (active in training mode only) with the cheaper mask above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x
