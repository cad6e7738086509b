"""BERT in one file: embeddings, encoder, pooler and the task heads.

Parameter names match Hugging Face's BertModel / BertFor* exactly, so a Hugging Face
state dict loads with `load_state_dict` (checkpoint.py adds the `bert.` prefix of base-model
checkpoints). Only torch is imported here: no recipes, no file formats, no tasks. Heads
return logits; losses are computed by the tasks.

Shapes: B batch, T sequence length, H hidden size, N heads, D = H / N head size,
R the real (non-padding) tokens of a batch.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class BertConfig:
    """The architecture, under BertConfig's own key names (config.json)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0


def parameter_count(cfg: BertConfig) -> int:
    """The trunk's parameters plus the largest head's (the MLM transform), from the shapes alone:
    what a model of this config will need before any tensor is made."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    embeddings = (cfg.vocab_size + cfg.max_position_embeddings + cfg.type_vocab_size) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    pooler = h * h + h
    heads = h * h + 3 * h + cfg.vocab_size + 2 * h + 2
    return embeddings + cfg.num_hidden_layers * layer + pooler + heads


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


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
    get no gradient; they cost at most 15 rows of work per matmul."""
    extra = -index.numel() % ROWS
    return torch.cat([index, index[:1].expand(extra)]) if extra and index.numel() else index


class Padding:
    """Where a padded batch's real tokens are: `kept` indexes the flattened (B * T) positions.
    `gather` makes the packed rows: the R real tokens, then copies of the first (`rounded`)."""

    def __init__(self, attention_mask: Tensor):
        self.shape = attention_mask.shape  # (B, T)
        self.kept = attention_mask.reshape(-1).nonzero().squeeze(1)  # (R,)
        self.gather = rounded(self.kept)  # (rows,)
        self.mask = attention_mask[:, None, None, :].bool()  # (B, 1, 1, T): True = attend to this key

    def pack(self, x: Tensor) -> Tensor:
        """(B, T, ...) -> (rows, ...)"""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.gather)

    def unpack(self, x: Tensor) -> Tensor:
        """(rows, ...) -> (B, T, ...), zeros at the padding."""
        full = x.new_zeros(self.shape.numel(), *x.shape[1:])
        return full.index_copy(0, self.kept, x[:self.kept.numel()]).view(*self.shape, *x.shape[1:])


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

    def __init__(self, needed: Tensor, attention_mask: Tensor):
        needed = needed.bool() & attention_mask.bool()  # (B, T)
        self.rows = rounded((attention_mask.reshape(-1).cumsum(0) - 1)[needed.reshape(-1)])  # (S, rounded up)
        counts = needed.sum(1)  # (B,)
        self.queries = Padding(torch.arange(int(counts.max()), device=needed.device)[None, :] < counts[:, None])
        self.out = Padding(needed)


class Dropout(nn.Module):
    """nn.Dropout's role (active in training mode only) with the cheaper mask above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p) if self.training else x


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor, positions: Tensor) -> Tensor:
        """Each input (B, T) or, packed, (R,); the output adds H."""
        words = WordLookup.apply(input_ids, self.word_embeddings.weight, self.word_embeddings.padding_idx)
        x = words + self.position_embeddings(positions) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.query = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.key = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.value = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.dropout_p = cfg.attention_probs_dropout_prob

    def forward(self, x: Tensor, pad: Padding | None, sel: Selection | None = None) -> Tensor:
        """x: (B, T, H), or (R, H) with `pad`; returns the same shape, or (S, H) for the rows of
        `sel` (which needs `pad`), the only ones queried."""
        q = self.query(x if sel is None else x.index_select(0, sel.rows))
        k, v = self.key(x), self.value(x)
        if pad is not None:
            q = pad.unpack(q) if sel is None else sel.queries.unpack(q)  # (B, T or Q, H)
            k, v = pad.unpack(k), pad.unpack(v)  # (B, T, H) each
        (B, Tq, H), T = q.shape, k.shape[1]
        q = q.view(B, Tq, self.num_heads, H // self.num_heads).transpose(1, 2)  # (B, N, Tq, D)
        k, v = (t.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2) for t in (k, v))  # (B, N, T, D)
        mask = pad.mask if pad is not None else None
        if self.training and self.dropout_p > 0:  # SDPA's CPU kernels cannot drop out: the same math, cheaper mask
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)  # (B, N, Tq, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            y = dropout(scores.softmax(-1), self.dropout_p) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, Tq, H)
        if pad is None:
            return y
        return pad.pack(y) if sel is None else sel.queries.pack(y)


class BertSelfOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, y: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(y)) + residual)


class BertAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertSelfOutput(cfg)

    def forward(self, x: Tensor, pad: Padding | None, sel: Selection | None = None) -> Tensor:
        return self.output(self.self(x, pad, sel), x if sel is None else x.index_select(0, sel.rows))


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x))  # (B, T, I)


class BertOutput(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.hidden_dropout_prob)

    def forward(self, h: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dropout(self.dense(h)) + residual)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg)

    def forward(self, x: Tensor, pad: Padding | None, sel: Selection | None = None) -> Tensor:
        x = self.attention(x, pad, sel)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: Tensor, pad: Padding | None, sel: Selection | None = None) -> Tensor:
        """With `sel`, the last layer returns the (S, H) selected rows only."""
        for i, layer in enumerate(self.layer):
            x = layer(x, pad, sel if i == len(self.layer) - 1 else None)
        return x


class BertPooler(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.dense(hidden[:, 0]))  # (B, H) from the [CLS] position


class BertModel(nn.Module):
    """The trunk: returns the last hidden states (B, T, H) and, with a pooler, (B, H).

    `needed` (B, T) bool names the positions whose hidden states the caller reads (the pooler's
    [CLS] is added); the others come back as zeros and cost the last layer nothing."""

    def __init__(self, cfg: BertConfig, add_pooling_layer: bool = True):
        super().__init__()
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by {cfg.num_attention_heads} heads")
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not one of {sorted(ACTIVATIONS)}")
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)
        self.pooler = BertPooler(cfg) if add_pooling_layer else None

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, needed: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, T)
        if needed is not None and self.pooler is not None:
            needed = needed.bool() | (positions == 0)
        if needed is None and (attention_mask is None or bool(attention_mask.all())):
            hidden = self.encoder(self.embeddings(input_ids, token_type_ids, positions), None)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            pad = Padding(attention_mask)
            sel = Selection(needed, attention_mask) if needed is not None else None
            x = self.embeddings(pad.pack(input_ids), pad.pack(token_type_ids), pad.pack(positions))  # (R, H)
            x = self.encoder(x, pad, sel)  # (R, H), or (S, H) with `sel`
            hidden = pad.unpack(x) if sel is None else sel.out.unpack(x)  # (B, T, H), zeros elsewhere
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return hidden, pooled


def init_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: normal(0, std) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(self.act(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # weight tied to word embeddings
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.low: Tensor | None = None  # the decoder weight in autocast's dtype, rewritten each training forward

    def forward(self, x: Tensor) -> Tensor:
        h, weight = self.transform(x), self.decoder.weight
        kind = h.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else weight.dtype
        low = None
        if dtype != weight.dtype and not torch.is_grad_enabled():
            low = weight.detach().to(dtype)  # serving: a temporary (one made in inference mode could not be trained with)
        elif dtype != weight.dtype:  # training: the copy is kept, so each step's cast allocates nothing
            if self.low is None or (self.low.dtype, self.low.shape, self.low.device) != (dtype, weight.shape, weight.device):
                self.low = torch.empty_like(weight, dtype=dtype)
            with torch.no_grad():
                low = self.low.copy_(weight)
        return TiedDecoder.apply(h.to(dtype), weight, low) + self.bias


class BertPreTrainingHeads(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(cfg)
        self.seq_relationship = nn.Linear(cfg.hidden_size, 2)


class BertForPreTraining(nn.Module):
    """MLM (+ NSP/SOP). The MLM head, and the trunk's last layer, run only at the positions asked
    for (and [CLS]), which saves the (tokens x vocab) matmul and most of a layer at the ~85% of
    positions that carry no label."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.cls = BertPreTrainingHeads(cfg)
        init_weights(self, cfg.initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None,
                mlm_positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """mlm_positions: (B, T) bool. Returns MLM logits (M, V) for the M selected positions
        (all B*T when None) and sentence-objective logits (B, 2)."""
        hidden, pooled = self.bert(input_ids, attention_mask, token_type_ids, needed=mlm_positions)
        selected = hidden[mlm_positions] if mlm_positions is not None else hidden.reshape(-1, hidden.shape[-1])
        count = selected.shape[0]
        rows = rounded(torch.arange(count, device=selected.device))  # as in Padding: the shapes repeat
        mlm_logits = self.cls.predictions(selected.index_select(0, rows))[:count]
        return mlm_logits, self.cls.seq_relationship(pooled)


class BertForSequenceClassification(nn.Module):
    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        _, pooled = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(pooled))  # (B, num_labels)


class BertForTokenClassification(nn.Module):
    def __init__(self, cfg: BertConfig, num_labels: int):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.dropout = Dropout(cfg.hidden_dropout_prob)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(hidden))  # (B, T, num_labels)


class BertForQuestionAnswering(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.qa_outputs = nn.Linear(cfg.hidden_size, 2)
        init_weights(self, cfg.initializer_range)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
        start, end = self.qa_outputs(hidden).unbind(-1)
        return start, end  # (B, T) each


def count_parameters(model: nn.Module, exclude_embeddings: bool = True) -> int:
    """Parameters, without the embedding tables when asked (for the FLOPs formula)."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embeddings and "embeddings" in name):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def flops_per_token(cfg: BertConfig, seq_len: int, non_embedding_params: int) -> float:
    """Training FLOPs per token: 6 x non-embedding parameters + attention (QK^T and AV)."""
    return 6 * non_embedding_params + 12 * cfg.num_hidden_layers * seq_len * cfg.hidden_size

