"""Which device and dtype a model runs on, from what a user asks ("auto", "cuda:1", "fp16", ...)."""

from __future__ import annotations

import torch

from .errors import VisionZipError


def pick_device(device: str | torch.device | None) -> torch.device:
    """None / "auto": cuda > mps > cpu; otherwise the named device (checked to exist)."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    asked = device
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise VisionZipError(f"unknown device {asked!r}; valid: auto, cpu, cuda, cuda:N, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise VisionZipError("device 'cuda' was asked for, but this torch has no CUDA device; use 'cpu' or 'auto'")
    return device


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
          "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None / "auto": fp16 on a GPU, fp32 on the CPU; otherwise the named dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if dtype not in DTYPES:
        raise VisionZipError(f"unknown dtype {dtype!r}; valid: auto, fp32, fp16, bf16")
    return DTYPES[dtype]


