"""BERT in one file: embeddings, encoder, pooler and the task heads.

Parameter names match Hugging Face's BertModel / BertFor* exactly, so a Hugging Face
state dict loads with `load_state_dict` (checkpoint.py adds the `bert.` prefix of base-model
checkpoints). Only torch is imported here: no recipes, no file formats, no tasks. Heads
return logits; losses are computed by the tasks.

Shapes: B batch, T sequence length, H hidden size, N heads, D = H / N head size,
R the real (non-padding) tokens of a batch.

The CPU fast path the layers use (packed rows without padding, queries at selected positions,
the tied word embeddings' in-place gradient, a cheaper dropout mask) is in fastpath.py, with
the measurements behind each piece.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bertcli.config import BertConfig
from bertcli.fastpath import Dropout, Masked, Padding, Selection, TiedDecoder, WordLookup, dropout, rounded

try:  # flash attention over packed rows of different lengths (PyTorch 2.9 and later, CUDA)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None


ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


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


def attention_kernel(device: str, training: bool, dropout_p: float, layout: str, dtype: torch.dtype,
                     head_dim: int, flash: bool = True) -> str:
    """Which attention runs, for the device type, the mode, the attention dropout, the batch's layout
    ("packed": real tokens only, fastpath.Padding; "padded": (B, T) with no padding; "exported":
    fastpath.Masked, the graph an export writes), the dtype of the queries, the head size, and whether
    the GPU runs flash attention (Ampere or later: fastpath.flash_gpu):

    - "written": scores, softmax and its own dropout written out. A CPU in training with attention
      dropout: SDPA's CPU kernels cannot drop out, and fall back to the same math with a dearer mask.
    - "exported": scores plus BERT's additive mask, the form ONNX Runtime fuses (bertcli export).
    - "varlen": on CUDA, a packed batch in half precision with no attention dropout to apply (inference,
      or attention dropout 0 as MosaicBERT, ModernBERT and Cramming pretrain): flash attention over
      the packed rows and their `cu` offsets, with no (B, T) layout at all. Its kernel takes head
      sizes that are multiples of 8 up to 256 (it does not pad them, as SDPA does).
    - "sdpa": scaled_dot_product_attention on (B, N, T, D), with the dropout on CUDA in training
      (its flash and memory-efficient kernels drop out themselves; no (B, N, T, T) scores are made).
    """
    drops = training and dropout_p > 0
    if layout == "exported":
        return "written" if drops else "exported"
    if device != "cuda":
        return "written" if drops else "sdpa"
    if (layout == "packed" and not drops and dtype in (torch.float16, torch.bfloat16) and varlen_attn is not None
            and flash and head_dim % 8 == 0 and head_dim <= 256):
        return "varlen"
    return "sdpa"


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
        layout = "exported" if isinstance(pad, Masked) else "packed" if pad is not None else "padded"
        kernel = attention_kernel(x.device.type, self.training, self.dropout_p, layout, q.dtype,
                                  q.shape[-1] // self.num_heads, flash=isinstance(pad, Padding) and pad.flash)
        if kernel == "varlen":
            return self._varlen(q, k, v, pad, sel)
        if pad is not None:
            q = pad.unpack(q) if sel is None else sel.queries.unpack(q)  # (B, T or Q, H)
            k, v = pad.unpack(k), pad.unpack(v)  # (B, T, H) each
        (B, Tq, H), T = q.shape, k.shape[1]
        q = q.view(B, Tq, self.num_heads, H // self.num_heads).transpose(1, 2)  # (B, N, Tq, D)
        k, v = (t.view(B, T, self.num_heads, H // self.num_heads).transpose(1, 2) for t in (k, v))  # (B, N, T, D)
        mask = pad.mask if pad is not None else None
        if kernel == "written":
            scores = (q * (q.shape[-1] ** -0.5)) @ k.transpose(-1, -2)  # (B, N, Tq, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            y = dropout(scores.softmax(-1), self.dropout_p) @ v
        elif kernel == "exported":
            scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5) + pad.bias
            y = scores.softmax(-1) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, Tq, H)
        if pad is None:
            return y
        return pad.pack(y) if sel is None else sel.queries.pack(y)

    def _varlen(self, q: Tensor, k: Tensor, v: Tensor, pad: Padding, sel: Selection | None) -> Tensor:
        """Attention on the packed rows themselves: q (rows, H) or (S rounded, H) with `sel`, k and v
        (rows, H). The rows past the real ones (`rounded`'s copies) are left out and made again."""
        queries = pad if sel is None else sel.queries
        n, H = queries.count, q.shape[1]
        shape = (-1, self.num_heads, H // self.num_heads)
        y = varlen_attn(q[:n].view(shape), k[:pad.count].view(shape), v[:pad.count].view(shape),
                        queries.cu, pad.cu, queries.longest, pad.longest).reshape(n, H)
        return torch.cat([y, y[:1].expand(q.shape[0] - n, H)]) if q.shape[0] > n else y


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
        """(B, H) from the [CLS] position, in fp32 under autocast too, as the classifier after it: (B, H) x
        (H, H) costs nothing beside the trunk. On 256 SST-2 sentences through MiniLM with a one-output
        head, bf16 inference's mean distance from fp32 went from 0.00243 to 0.00215 (the trunk's bf16
        makes the rest)."""
        with torch.autocast(hidden.device.type, enabled=False):
            return torch.tanh(self.dense(hidden[:, 0].float()))


class TrunkOutput(NamedTuple):
    hidden: Tensor  # (B, T, H) last hidden states
    pooled: Tensor | None  # (B, H) from [CLS], None without a pooler


class PretrainingLogits(NamedTuple):
    mlm: Tensor  # (M, V) at the M selected positions
    sentence: Tensor  # (B, 2) next-sentence / sentence-order logits


class SpanLogits(NamedTuple):
    start: Tensor  # (B, T) answer-start logits
    end: Tensor  # (B, T) answer-end logits


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
        self.packed = True  # a padded batch runs on its real tokens alone (fastpath.Padding); False: padded (Masked)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, needed: Tensor | None = None) -> TrunkOutput:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)  # (B, T)
        if needed is not None and self.pooler is not None:
            needed = needed.bool() | (positions == 0)
        if not self.packed:  # an exported graph: no branch on the data, the mask read in attention
            pad = Masked(attention_mask) if attention_mask is not None else None
            hidden = self.encoder(self.embeddings(input_ids, token_type_ids, positions), pad)
        elif needed is None and attention_mask is None:
            hidden = self.encoder(self.embeddings(input_ids, token_type_ids, positions), None)
        else:
            hidden = self._packed(input_ids, token_type_ids, positions, attention_mask, needed)
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return TrunkOutput(hidden, pooled)

    def _packed(self, input_ids: Tensor, token_type_ids: Tensor, positions: Tensor, attention_mask: Tensor | None,
                needed: Tensor | None) -> Tensor:
        """The trunk on the batch's real tokens alone (and, with `needed`, the last layer at those positions).
        Its layout is computed on the host from one copy of the mask: the one time the accelerator is
        waited for."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        host = torch.stack([mask] if needed is None else [mask, needed.bool()]).cpu()  # (1 or 2, B, T)
        if needed is None and bool(host[0].all()):
            return self.encoder(self.embeddings(input_ids, token_type_ids, positions), None)
        device = input_ids.device
        pad = Padding(host[0], device)
        sel = Selection(host[1], host[0], device) if needed is not None else None
        x = self.embeddings(pad.pack(input_ids), pad.pack(token_type_ids), pad.pack(positions))  # (R, H)
        x = self.encoder(x, pad, sel)  # (R, H), or (S, H) with `sel`
        return pad.unpack(x) if sel is None else sel.out.unpack(x)  # (B, T, H), zeros elsewhere


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
                mlm_positions: Tensor | None = None, mlm_index: Tensor | None = None) -> PretrainingLogits:
        """mlm_positions: (B, T) bool. Returns MLM logits (M, V) for the M selected positions
        (all B*T when None) and sentence-objective logits (B, 2). `mlm_index`, the same positions as
        indices into the flattened (B * T) made on the host (the pretraining batch's own), reads them
        without waiting for the accelerator: boolean indexing must wait to learn M."""
        hidden, pooled = self.bert(input_ids, attention_mask, token_type_ids, needed=mlm_positions)
        flat = hidden.reshape(-1, hidden.shape[-1])
        if mlm_index is not None:
            selected = flat.index_select(0, mlm_index)
        else:
            selected = hidden[mlm_positions] if mlm_positions is not None else flat
        count = selected.shape[0]
        rows = rounded(torch.arange(count, device=selected.device))  # as in Padding: the shapes repeat
        mlm_logits = self.cls.predictions(selected.index_select(0, rows))[:count]
        return PretrainingLogits(mlm_logits, self.cls.seq_relationship(pooled))


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
        with torch.autocast(pooled.device.type, enabled=False):  # the last layer in fp32: a bf16 score has 3 digits
            return self.classifier(self.dropout(pooled).float())  # (B, num_labels)


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
                token_type_ids: Tensor | None = None) -> SpanLogits:
        hidden, _ = self.bert(input_ids, attention_mask, token_type_ids)
        start, end = self.qa_outputs(hidden).unbind(-1)
        return SpanLogits(start, end)
