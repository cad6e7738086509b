"""Where and in what precision the model runs: one device rule and one precision rule for
training, evaluate and predict."""

from __future__ import annotations

import torch

from bertcli.errors import BertcliError


def device_for(precision: str, local_rank: int = 0, key: str = "train.precision") -> torch.device:
    """The GPU of this process when there is one, else the CPU (which has no fp16 training: no loss
    scaler there; `key` names the setting in the message)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    if precision == "fp16":
        raise BertcliError(f"{key}: fp16 needs a CUDA GPU; use bf16 (or fp32) on a CPU")
    return torch.device("cpu")


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 on hardware with native bf16 matrix units (AVX512-BF16 or AMX on CPUs, Ampere or
    later GPUs), where it is about twice as fast or more at the same accuracy; fp32 elsewhere."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if fast else "fp32"


def autocast(device: torch.device, precision: str):
    """The autocast context of `precision` (fp32: none)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def inference(precision: str) -> tuple[torch.device, str]:
    """The device and the resolved precision for evaluate and predict."""
    device = device_for(precision, key="--precision")
    return device, resolve_precision(precision, device)
