"""Where and in what precision models run: dtype names and device checks, one rule for all."""

from __future__ import annotations

import torch

from diffgeo.errors import InputError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float64": torch.float64, "fp64": torch.float64}


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from a dtype or one of the names in ``DTYPES``."""
    if isinstance(dtype, str):
        try:
            return DTYPES[dtype]
        except KeyError:
            raise InputError(f"dtype must be float32, float16, bfloat16 or float64, got {dtype!r}"
                             ) from None
    return dtype


def check_device(device: str | torch.device) -> None:
    """Refuse a device this machine does not have, before any model is loaded."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"device {device!r} is not available here ({e})") from None
