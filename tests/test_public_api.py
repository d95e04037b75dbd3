"""The package's public face: `import diffgeo` gives the entry points, and they work together."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import diffgeo


def test_every_entry_point_resolves_and_unknown_names_fail():
    for name in diffgeo.__all__:
        assert getattr(diffgeo, name) is not None, name
    assert set(diffgeo.__all__) <= set(dir(diffgeo))
    with pytest.raises(AttributeError, match="no attribute 'ddim_step'"):
        diffgeo.ddim_step  # noqa: B018


def test_import_is_cheap():
    """`import diffgeo` (and so the CLI's start) loads no torch until an entry point is used."""
    code = "import sys, diffgeo; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_readme_flow_through_the_public_names(pixel_path, tmp_path):
    from PIL import Image

    bb = diffgeo.load_backbone(str(pixel_path))
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(tmp_path / "x.png")
    x, fit = diffgeo.load_image(tmp_path / "x.png", size=bb.image_size)
    grid = diffgeo.Grid.for_model(bb, 10)
    inv = diffgeo.invert(bb, bb.to_state(x), t=500, grid=grid, exact=True, tol=1e-6)
    rec = diffgeo.generate(bb, inv.last, t=500, grid=grid).last
    assert float((rec - x).abs().max()) < 1e-3
    assert inv.grid.timesteps == (0, 100, 200, 300, 400, 500)
    curves = diffgeo.generation_curves(bb, inv, [diffgeo.pixel_component(bb, (3, 4))], "h")
    assert curves.values.shape[-1] == len(inv.noisy_timesteps())
