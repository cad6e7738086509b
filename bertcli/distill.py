"""Distillation from the teacher's layers, at the same relative depth (a uniform layer map), in one
of two forms:

- every token (TinyBERT's hidden-state loss, train.distill_hidden): the mean squared difference per
  real token (mean over the hidden size), summed over the tokens and the mapped layers and divided by
  the step's token count;
- each text's [CLS] vector (Patient KD, Sun et al. 2019, train.distill_cls): the squared distance
  between the two vectors, each scaled to length 1, summed over the texts and the mapped layers and
  divided by the step's text count. Classification reads [CLS] alone, and its length-1 direction is
  what the student can match with fewer layers.

Each step, forward hooks keep the output of the mapped layers of both models. Both models read the
same batch, so both lay it out alike (packed rows, fastpath.Padding) and their rows pair up.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from bertcli.fastpath import Masked, Padding

Kept = dict[int, tuple[Tensor, object]]  # a layer's output and its layout (Padding, Masked or None), by layer


def layer_map(student: int, teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: student layer k of M learns teacher layer (k + 1) x N / M - 1 of N,
    rounded down (3 of 6: 1, 3, 5; the last always the last)."""
    return [(k, (k + 1) * teacher // student - 1) for k in range(student)]


def _first_rows(hidden: Tensor, pad) -> Tensor:
    """(texts, H): a layer's output at each text's first token, [CLS]."""
    if isinstance(pad, Padding):
        return hidden.index_select(0, pad.cu[:-1].long())
    return hidden[:, 0]  # padded (B, T, H): Masked, or a batch with no padding


def _real_rows(hidden: Tensor, pad) -> Tensor:
    """(real tokens, H): a layer's output without padding or rounding rows."""
    if isinstance(pad, Padding):
        return hidden[:pad.count]
    if isinstance(pad, Masked):
        return hidden[pad.mask[:, 0, 0, :]]
    return hidden.reshape(-1, hidden.shape[-1])  # a batch with no padding


@contextlib.contextmanager
def layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[Kept]:
    """While open, each forward pass of `model` puts the output of `layers` (its encoder's layer numbers),
    with the layout it has (fastpath.Padding, Masked or None), into the yielded dict."""
    kept: Kept = {}
    model = getattr(model, "module", model)  # the model inside DistributedDataParallel
    trunk = model.bert if hasattr(model, "bert") else model
    handles = []
    for i in layers:
        def keep(module, args, output, i=i):
            assert len(args) < 3 or args[2] is None, "a layer that returns selected rows (pretraining's) has no layout to pair"
            kept[i] = (output, args[1])
        handles.append(trunk.encoder.layer[i].register_forward_hook(keep))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


def hidden_loss(student: Kept, teacher: Kept, pairs: Sequence[tuple[int, int]], tokens: int) -> Tensor:
    """The sum over `pairs` and real tokens of the mean squared difference over the hidden size, in fp32,
    divided by `tokens` (the step's real tokens over all micro-batches and processes: train's counts)."""
    return sum((_real_rows(*student[s]).float() - _real_rows(*teacher[t]).float()).pow(2).mean(-1).sum()
               for s, t in pairs) / tokens


def cls_loss(student: Kept, teacher: Kept, pairs: Sequence[tuple[int, int]], texts: int) -> Tensor:
    """The sum over `pairs` and texts of the squared distance between the [CLS] vectors scaled to length 1,
    in fp32, divided by `texts` (the step's texts over all micro-batches and processes: train's counts)."""
    def unit(kept):
        return F.normalize(_first_rows(*kept).float(), dim=-1)

    return sum((unit(student[s]) - unit(teacher[t])).pow(2).sum(-1).sum() for s, t in pairs) / texts
