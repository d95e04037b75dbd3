"""Make diffusers U-Nets differentiable in both AD modes without slowing plain forward passes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    # A clone in contiguous format also makes a forward-AD tangent contiguous; .contiguous() would
    # be a no-op on the (already contiguous) primal and leave the tangent as it was.
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


@contextlib.contextmanager
def unet_derivative_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Classic (bmm) attention processors and contiguous GroupNorm inputs, restored on exit."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    saved: list[tuple[Attention, object]] = []
    hooks = []
    try:
        for root in modules:
            for mod in root.modules():
                if isinstance(mod, Attention):
                    saved.append((mod, mod.processor))
                    mod.set_processor(AttnProcessor())
                elif isinstance(mod, torch.nn.GroupNorm):
                    hooks.append(mod.register_forward_pre_hook(_contiguous_input))
        yield
    finally:
        for h in hooks:
            h.remove()
        for mod, proc in saved:
            mod.set_processor(proc)
