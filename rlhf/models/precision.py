"""Mixed precision: fp32 master weights, bf16 compute through autocast."""
from __future__ import annotations

import contextlib

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def autocast(compute_dtype: str, device: torch.device | str):
    """Autocast context for `compute_dtype` ('bf16' or 'fp32': no-op)."""
    if compute_dtype == "fp32":
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=DTYPES[compute_dtype])
