"""Batches: length-grouped order (less padding) and dynamic padding to the longest in a batch."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def batch_order(lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, shuffle: bool = True,
                group: int = 50) -> list[np.ndarray]:
    """Indices in batches (arrays). With shuffle, examples are shuffled, sorted by length inside
    windows of `group` batches, and the batches shuffled again, as Hugging Face's group_by_length does
    (`group` 0: shuffled only, as its default sampler). The order depends only on `seed`, so a
    resumed run sees the same batches. numpy throughout: millions of pretraining sequences cost
    8 bytes each, not a Python object each."""
    n = len(lengths)
    if not shuffle:
        indices = np.arange(n)
    else:
        rng = np.random.default_rng(seed)
        indices = rng.permutation(n)
        if group:
            lengths = np.asarray(lengths)
            window = batch_size * group
            for start in range(0, n, window):
                part = indices[start:start + window]
                indices[start:start + window] = part[np.argsort(-lengths[part], kind="stable")]
    batches = [indices[i:i + batch_size] for i in range(0, n, batch_size)]
    if shuffle and group:
        batches = [batches[k] for k in rng.permutation(len(batches))]
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
        if isinstance(values[0], (list, tuple, np.ndarray)):
            batch[key] = pad(values, -100)
        elif isinstance(values[0], (int, float)):
            batch[key] = torch.tensor(values)
    return batch


def compact(feature: dict) -> dict:
    """A feature's lists of token ids and labels as int32 arrays: 4 bytes a number instead of a Python
    int and its pointer (about 36), which is most of what a large training set holds in memory."""
    return {k: np.asarray(v, dtype=np.int32) if isinstance(v, list) else v for k, v in feature.items()}
