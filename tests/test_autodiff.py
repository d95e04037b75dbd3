"""Derivative mode: what it changes in a U-Net, and that second-order derivatives are right."""

from __future__ import annotations

import pytest
import torch
from torch.func import jvp

from diffgeo.backbones.autodiff import layer_norm_from_moments, unet_derivative_mode


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape, affine", [((16,), True), ((16,), False), ((8, 16), True)])
def test_layer_norm_from_moments_equals_the_fused_kernel(shape, affine):
    ln = torch.nn.LayerNorm(shape, elementwise_affine=affine, eps=1e-5).double()
    if affine:
        with torch.no_grad():
            ln.weight.copy_(torch.rand(shape, generator=_gen(1), dtype=torch.float64) + 0.5)
            ln.bias.copy_(torch.randn(shape, generator=_gen(2), dtype=torch.float64))
    x = 3 * torch.randn(2, 5, 8, 16, generator=_gen(0), dtype=torch.float64) + 1
    assert torch.allclose(layer_norm_from_moments(ln, x), ln(x), rtol=1e-12, atol=1e-12)
    ln32, x32 = ln.float(), x.float()
    assert torch.allclose(layer_norm_from_moments(ln32, x32), ln32(x32), atol=1e-5)
    lnh, xh = ln.to(torch.bfloat16), x.to(torch.bfloat16)
    out = layer_norm_from_moments(lnh, xh)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), lnh(xh).float(), atol=0.05)


def _jvp_norm_gradient_and_fd(f, x: torch.Tensor) -> tuple[float, float]:
    """d/dx ‖Df(x)[v]‖ along d by reverse over forward, and by central differences."""
    v = torch.randn(x.shape, generator=_gen(3), dtype=x.dtype)
    d = torch.randn(x.shape, generator=_gen(4), dtype=x.dtype)
    rate = lambda z: jvp(f, (z,), (v,))[1].norm()  # noqa: E731
    z = x.clone().requires_grad_(True)
    rate(z).backward()
    s = 1e-6
    with torch.no_grad():
        fd = (rate(x + s * d) - rate(x - s * d)) / (2 * s)
    return float((z.grad * d).sum()), float(fd)


def test_second_order_derivatives_through_norms_in_derivative_mode():
    """The gradient of a JVP's norm (what curve matching differentiates) through a LayerNorm
    and a GroupNorm equals central differences inside derivative mode."""
    with torch.random.fork_rng():  # module init draws from the global generator
        torch.manual_seed(5)
        net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.GroupNorm(2, 8),
                                  torch.nn.SiLU(), torch.nn.Flatten(2),
                                  torch.nn.LayerNorm(64)).double()
    with torch.no_grad():
        net[4].weight.uniform_(0.5, 1.5, generator=_gen(5))
    x = torch.randn(2, 4, 8, 8, generator=_gen(6), dtype=torch.float64)
    with unet_derivative_mode(net):
        analytic, fd = _jvp_norm_gradient_and_fd(net, x)
    # fp64 central differences with s = 1e-6: rounding ~1e-10 on a value of order 1e-2..1;
    # the fused LayerNorm gives 4.217 where central differences give 3.882 on this net
    assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-9)


def test_derivative_mode_restores_the_modules():
    with torch.random.fork_rng():
        torch.manual_seed(7)
        net = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.LayerNorm(6),
                                  torch.nn.GroupNorm(2, 6))
    x = torch.randn(3, 6, generator=_gen(7))
    before = net(x)
    with unet_derivative_mode(net):
        assert "forward" in vars(net[1])
        inside = net(x)
    assert "forward" not in vars(net[1]) and not net[2]._forward_pre_hooks
    assert torch.allclose(inside, before, atol=1e-6) and torch.equal(net(x), before)
    # nested use (a backbone entering derivative mode twice) patches and restores once
    with unet_derivative_mode(net), unet_derivative_mode(net):
        assert torch.allclose(net(x), before, atol=1e-6)
    assert "forward" not in vars(net[1])
