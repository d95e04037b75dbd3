"""Make diffusers U-Nets differentiable in both AD modes without slowing plain forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    # A clone in contiguous format also makes a forward-AD tangent contiguous; .contiguous() would
    # be a no-op on the (already contiguous) primal and leave the tangent as it was.
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


@contextlib.contextmanager
def unet_derivative_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Math attention kernel and contiguous GroupNorm inputs, restored on exit.

    The fused CPU attention kernels have no forward AD (and no double backward); the math backend
    of scaled_dot_product_attention has both and keeps the model's own processors and dtype
    (the classic bmm processor would upcast the softmax to float32, downcasting float64 models).
    """
    hooks = []
    try:
        for root in modules:
            for mod in root.modules():
                if isinstance(mod, torch.nn.GroupNorm):
                    hooks.append(mod.register_forward_pre_hook(_contiguous_input))
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for h in hooks:
            h.remove()
