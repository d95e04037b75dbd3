"""The README's Python API block runs as written, on the embedded default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_one_python_block_on_the_public_api():
    blocks = _python_blocks()
    assert len(blocks) == 1 and "import diffgeo\n" in blocks[0]
    assert "diffgeo.ddim" not in blocks[0] and "num_steps" not in blocks[0]


@pytest.mark.slow
def test_the_readme_python_block_runs(tmp_path):
    from diffgeo.data import bundled_scenes

    scene = bundled_scenes()[0]
    Image.fromarray((scene.composite * 255).astype(np.uint8)).save(tmp_path / "photo.jpg")
    Image.fromarray((scene.mask * 255).astype(np.uint8)).save(tmp_path / "region.png")
    code = _python_blocks()[0] + (
        "\nimport math\n"
        "assert math.isfinite(float(saliency.sum())) and removed.shape == x.shape\n"
        "assert edits.shape[0] == 2 and dirs.timestep == 500\n"
        "print('README OK')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "README OK" in out.stdout
