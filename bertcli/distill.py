"""Distillation from the teacher's layers: the student's encoder layers learn to give what the teacher's
give at the same relative depth (TinyBERT's hidden-state loss, with its uniform layer map).

Each step, forward hooks keep the output of the mapped layers of both models; the loss is the mean
squared difference per real token (mean over the hidden size), summed over the tokens and the mapped
layers and divided by the step's token count. Both models read the same batch, so both lay it out
alike (packed rows, fastpath.Padding) and their rows pair up.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

from torch import Tensor, nn

from bertcli.fastpath import Masked, Padding


def layer_map(student: int, teacher: int) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: student layer k of M learns teacher layer (k + 1) x N / M - 1 of N,
    rounded down (3 of 6: 1, 3, 5; the last always the last)."""
    return [(k, (k + 1) * teacher // student - 1) for k in range(student)]


def _real_rows(hidden: Tensor, pad) -> Tensor:
    """(real tokens, H): a layer's output without padding or rounding rows."""
    if isinstance(pad, Padding):
        return hidden[:pad.count]
    if isinstance(pad, Masked):
        return hidden[pad.mask[:, 0, 0, :]]
    return hidden.reshape(-1, hidden.shape[-1])  # a batch with no padding


@contextlib.contextmanager
def layer_outputs(model: nn.Module, layers: Sequence[int]) -> Iterator[dict[int, Tensor]]:
    """While open, each forward pass of `model` puts the real-token outputs of `layers` (its encoder's layer
    numbers) into the yielded dict."""
    kept: dict[int, Tensor] = {}
    model = getattr(model, "module", model)  # the model inside DistributedDataParallel
    trunk = model.bert if hasattr(model, "bert") else model
    handles = []
    for i in layers:
        def keep(module, args, output, i=i):
            kept[i] = _real_rows(output, args[1])
        handles.append(trunk.encoder.layer[i].register_forward_hook(keep))
    try:
        yield kept
    finally:
        for h in handles:
            h.remove()


def hidden_loss(student: dict[int, Tensor], teacher: dict[int, Tensor], pairs: Sequence[tuple[int, int]],
                tokens: int) -> Tensor:
    """The sum over `pairs` and real tokens of the mean squared difference over the hidden size, in fp32,
    divided by `tokens` (the step's real tokens over all micro-batches and processes: train's counts)."""
    return sum((student[s].float() - teacher[t].float()).pow(2).mean(-1).sum() for s, t in pairs) / tokens
