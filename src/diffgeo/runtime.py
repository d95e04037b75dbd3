"""Where and in what precision models run: dtype names and device checks, one rule for all."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


@contextlib.contextmanager
def strict_float32() -> Iterator[None]:
    """TF32 off for CUDA matmuls and convolutions within the block (restored after): float32
    as float32. Needed wherever rounding is amplified, as by a finite difference (TF32 keeps
    10 mantissa bits; cuDNN allows it for convolutions by default)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def check_device(device: str | torch.device) -> None:
    """Refuse a device this machine does not have, before any model is loaded."""
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise InputError(f"device {device!r} is not available here ({e})") from None


def memory_available(device: str | torch.device) -> int:
    """Bytes a run may use on ``device``: the GPU's total memory, else this machine's RAM."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.get_device_properties(dev).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # not POSIX: no estimate, no refusal
        return 1 << 62


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(nbytes: float, what: str, lower: str, device: str | torch.device,
                 limit_gib: float | None = None) -> None:
    """Refuse, before the work, a run whose largest allocation (``nbytes``, estimated from its
    options and the model) exceeds the budget: ``limit_gib`` (``--max-memory``) or 80% of
    :func:`memory_available`. The message names the option to lower (``lower``)."""
    limit = limit_gib * 2**30 if limit_gib is not None else 0.8 * memory_available(device)
    if nbytes > limit:
        source = "--max-memory" if limit_gib is not None else "80% of this device's memory"
        raise InputError(f"{what} would need about {_gib(nbytes)}, above the {_gib(limit)} "
                         f"budget ({source}): lower {lower}, or raise --max-memory")
