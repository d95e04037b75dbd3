"""Make diffusers U-Nets differentiable in both AD modes without slowing plain forward passes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    # A clone in contiguous format also makes a forward-AD tangent contiguous; .contiguous() would
    # be a no-op on the (already contiguous) primal and leave the tangent as it was.
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


def layer_norm_from_moments(module: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` written with mean, variance and rsqrt, whose derivatives of every order
    are right.

    Why: torch's fused layer_norm returns wrong second-order forward-mode derivatives
    (pytorch/pytorch#196700, open on torch 2.13), so the gradient of a JVP through it — what
    curve matching differentiates — is wrong: 0.25-10% off central differences on a tiny
    Stable Diffusion U-Net, sign flipped on a bare LayerNorm. Statistics are taken in at least
    float32, as the fused kernel does for half precision.
    """
    dims = tuple(range(-len(module.normalized_shape), 0))
    acc = x.to(torch.promote_types(x.dtype, torch.float32))
    centred = acc - acc.mean(dims, keepdim=True)
    y = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + module.eps)
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y.to(x.dtype)


@contextlib.contextmanager
def unet_derivative_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Math attention kernel, contiguous GroupNorm inputs and LayerNorms written from their
    moments (``layer_norm_from_moments``), all restored on exit.

    The fused CPU attention kernels have no forward AD (and no double backward); the math backend
    of scaled_dot_product_attention has both and keeps the model's own processors and dtype
    (the classic bmm processor would upcast the softmax to float32, downcasting float64 models).
    """
    hooks, patched = [], []
    try:
        for root in modules:
            for mod in root.modules():
                if isinstance(mod, torch.nn.GroupNorm):
                    hooks.append(mod.register_forward_pre_hook(_contiguous_input))
                elif isinstance(mod, torch.nn.LayerNorm) and "forward" not in vars(mod):
                    # an instance attribute shadows the class's forward until deleted below
                    mod.forward = functools.partial(layer_norm_from_moments, mod)
                    patched.append(mod)
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        for h in hooks:
            h.remove()
        for mod in patched:
            del mod.forward
