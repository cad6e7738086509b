"""Batches: length-grouped order (less padding) and dynamic padding to the longest in a batch."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torch import Tensor


def batch_order(lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                group: int = 50) -> list[list[int]]:
    """Indices in batches. With shuffle, examples are shuffled, sorted by length inside windows
    of `group` batches, and the batches shuffled again, as Hugging Face's group_by_length does
    (`group` 0: shuffled only, as its default sampler). The order depends only on `seed`, so a
    resumed run sees the same batches."""
    indices = list(range(len(lengths)))
    if not shuffle:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    rng = random.Random(seed)
    rng.shuffle(indices)
    if group == 0:
        return [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
    window = batch_size * group
    ordered: list[int] = []
    for start in range(0, len(indices), window):
        ordered.extend(sorted(indices[start:start + window], key=lambda i: -lengths[i]))
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def pad(rows: Sequence[Sequence[int]], value: int) -> Tensor:
    """(B, T) tensor of the rows padded with `value` to the longest."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def collate(features: Sequence[dict], pad_id: int) -> dict[str, Tensor]:
    """input_ids / token_type_ids / attention_mask padded; other list fields padded with -100,
    scalar fields stacked."""
    batch = {
        "input_ids": pad([f["input_ids"] for f in features], pad_id),
        "token_type_ids": pad([f["token_type_ids"] for f in features], 0),
        "attention_mask": pad([[1] * len(f["input_ids"]) for f in features], 0),
    }
    for key in features[0]:
        if key in batch:
            continue
        values = [f[key] for f in features]
        if isinstance(values[0], (list, tuple)):
            batch[key] = pad(values, -100)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
    return batch
