"""PIXELS: progressive exemplar editing (Algorithms 1 and 2) on the tiny backbones."""

from __future__ import annotations

import math

import pytest
import torch

from diffgeo import sampling
from diffgeo.editing.pixels import (
    THRESHOLDS,
    PixelsConfig,
    edit_start,
    grow_and_blur,
    pixels_edit,
    pixels_iterative,
    place_exemplar,
    prepare_map,
    threshold_schedule,
)
from diffgeo.errors import InputError

STEPS = 10


def _images(bb, k: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = bb.image_size
    return [torch.rand(1, 3, h, w, generator=g) * 2 - 1 for _ in range(k)]


def _states(bb, k: int) -> list[torch.Tensor]:
    with torch.no_grad():
        return [bb.to_state(x.to(bb.dtype)) for x in _images(bb, k)]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _half_map(h: int, w: int, left_keeps: bool = True) -> torch.Tensor:
    m = torch.zeros(h, w)
    if left_keeps:
        m[:, : w // 2] = 1
    else:
        m[:, w // 2:] = 1
    return m


@pytest.mark.parametrize("name", THRESHOLDS)
def test_thresholds_monotone_in_unit_interval(name):
    for n in (1, 2, 7, 50):
        thr = threshold_schedule(name, n)
        assert thr.shape == (n,)
        # every schedule but the paper's sigmoid starts at 0
        start = 1 / (1 + math.exp(3)) if name == "sigmoid" else 0.0
        assert float(thr[0]) == pytest.approx(start, abs=1e-12)
        assert bool((thr[1:] >= thr[:-1]).all())
        assert float(thr.min()) >= 0 and float(thr.max()) < 1


def test_sigmoid_threshold_is_the_papers_formula():
    """PIXELS' appendix: threshold(i) = sigmoid(6i/N − 3), i = 0..N-1 (0.047 at i = 0)."""
    n = 10
    want = torch.tensor([1 / (1 + math.exp(-(6 * i / n - 3))) for i in range(n)],
                        dtype=torch.float64)
    assert torch.allclose(threshold_schedule("sigmoid", n), want, rtol=0, atol=1e-15)
    assert float(threshold_schedule("sigmoid", n)[0]) == pytest.approx(0.0474258732, abs=1e-9)
    ours = threshold_schedule("sigmoid-normalized", n)
    assert torch.allclose(ours, (want - want[0]) / (1 / (1 + math.exp(-3)) - want[0]),
                          rtol=0, atol=1e-15)


def test_threshold_callable_and_errors():
    thr = threshold_schedule(lambda i, n: (i / n) ** 0.5, 4)
    assert torch.allclose(thr, torch.tensor([0, 0.5, 2**-0.5, 0.75**0.5], dtype=torch.float64))
    with pytest.raises(InputError, match="threshold"):
        threshold_schedule("nope", 4)
    with pytest.raises(InputError, match="threshold"):
        threshold_schedule(lambda i, n: 2.0, 4)
    with pytest.raises(InputError, match="threshold"):
        threshold_schedule(3, 4)


def test_map_validation():
    with pytest.raises(InputError, match="maps\\[0\\]|map"):
        prepare_map(torch.full((8, 8), 1.5), (8, 8))
    with pytest.raises(InputError, match="one channel"):
        prepare_map(torch.ones(3, 8, 8), (8, 8))
    with pytest.raises(InputError, match="aspect"):
        prepare_map(torch.ones(8, 16), (8, 8))
    with pytest.raises(InputError, match="NaN"):
        prepare_map(torch.full((8, 8), float("nan")), (8, 8))
    with pytest.raises(InputError, match="shape"):
        prepare_map(torch.ones(8), (8, 8))
    with pytest.raises(InputError, match="floats"):
        prepare_map(torch.ones(8, 8, dtype=torch.long), (8, 8))
    m = prepare_map(torch.ones(16, 16), (8, 8))
    assert m.shape == (1, 1, 8, 8) and bool((m == 1).all())
    assert bool((prepare_map(torch.ones(8, 8), (8, 8), invert=True) == 0).all())


def test_grow_and_blur_and_placement():
    mask = torch.zeros(16, 16)
    mask[6:10, 6:10] = 1
    m = grow_and_blur(mask, grow=2)
    assert int((m == 0).sum()) == 8 * 8  # grown by 2 each side, flipped to polarity
    mb = grow_and_blur(mask, grow=2, blur=0.5)
    assert 0 <= float(mb.min()) < 0.5 and float(mb.max()) == pytest.approx(1.0, abs=1e-3)
    assert 0 < float(mb[0, 0, 8, 3]) < 1  # a soft edge
    assert float(mb[0, 0, 8, 8]) == 0.0  # the core is exactly 0: step 0 takes the exemplar there
    with pytest.raises(InputError, match="grow"):
        grow_and_blur(mask, grow=-1)
    canvas = torch.zeros(1, 3, 16, 16)
    ex = torch.ones(1, 3, 8, 8)
    placed, cover = place_exemplar(ex, canvas, offset=(12, -2), scale=0.5)
    assert float(cover.sum()) == 4 * 2 and float(placed.sum()) == 3 * 8
    with pytest.raises(InputError, match="offset"):
        place_exemplar(ex, canvas, offset=(40, 0))


def test_edit_start_is_on_grid(pixel_bb):
    t, times = edit_start(pixel_bb, 0.8, 50)  # img2img: int(50·0.8) = 40 steps from 780
    assert t == 780 and times[0] == 780 and times[-1] == 0 and len(times) == 40
    with pytest.raises(InputError, match="strength"):
        edit_start(pixel_bb, 0.0, 50)
    with pytest.raises(InputError, match="executes no step"):
        edit_start(pixel_bb, 0.01, 50)


def test_all_ones_map_is_the_source_regenerated_from_the_same_noise(pixel_bb):
    src, ex = _states(pixel_bb, 2)
    r = pixels_edit(pixel_bb, src, [ex], [torch.ones(16, 16)], PixelsConfig(strength=0.6),
                    generator=_gen(3), grid=STEPS)
    g = _gen(3)
    z = torch.randn(src.shape, generator=g)
    # every step pins the noised source, so the output is the last DDIM step from it
    t0 = r.timesteps[-1]
    ab = sampling.alpha_bar(pixel_bb, t0)
    xt = ab**0.5 * src + (1 - ab) ** 0.5 * z
    expected = sampling.ddim_step(xt, pixel_bb.eps(xt, t0), ab, sampling.alpha_bar(pixel_bb, None))
    assert torch.allclose(r.state, expected, atol=1e-6)
    assert bool((r.masks == 1).all())


def test_all_zeros_map_is_sdedit_of_the_exemplar(pixel_bb):
    src, ex = _states(pixel_bb, 2)
    r = pixels_edit(pixel_bb, src, [ex], [torch.zeros(16, 16)], PixelsConfig(strength=0.5),
                    generator=_gen(4), grid=STEPS)
    g = _gen(4)
    torch.randn(src.shape, generator=g)  # the source's draw comes first
    z = torch.randn(src.shape, generator=g)
    t = r.timesteps[0]
    ab = sampling.alpha_bar(pixel_bb, t)
    gen = sampling.generate(pixel_bb, ab**0.5 * ex + (1 - ab) ** 0.5 * z, t, STEPS)
    assert torch.allclose(r.state, gen.last, atol=1e-5)


@pytest.mark.parametrize("which", ["pixel", "sd"])
def test_binary_map_first_latent_is_the_surgical_latent(which, pixel_bb, sd_bb):
    bb = pixel_bb if which == "pixel" else sd_bb
    src, ex = _states(bb, 2)
    h, w = bb.state_shape[-2:]
    mu = _half_map(h, w)
    r = pixels_edit(bb, src, [ex], [mu], PixelsConfig(strength=0.8),
                    generator=_gen(5), grid=STEPS, record_states=True)
    g = _gen(5)
    z1, z2 = torch.randn(src.shape, generator=g), torch.randn(src.shape, generator=g)
    t = r.timesteps[0]
    ab = sampling.alpha_bar(bb, t)
    m = mu[None, None]
    surgical = (ab**0.5 * src + (1 - ab) ** 0.5 * z1) * m + \
        (ab**0.5 * ex + (1 - ab) ** 0.5 * z2) * (1 - m)
    assert torch.equal(r.states[0], r.surgical)
    assert torch.allclose(r.surgical, surgical, atol=1e-6)
    assert r.state.shape == src.shape and bool(torch.isfinite(r.state).all())


def test_two_exemplars_equal_algorithm_2_by_hand(pixel_bb):
    bb = pixel_bb
    src, e1, e2 = _states(bb, 3)
    mu1 = torch.rand(16, 16, generator=_gen(10))
    mu2 = torch.rand(16, 16, generator=_gen(11))
    r = pixels_edit(bb, src, [e1, e2], [mu1, mu2], PixelsConfig(strength=0.7),
                    generator=_gen(6), grid=STEPS)
    g = _gen(6)
    z1, z2, z3 = (torch.randn(src.shape, generator=g) for _ in range(3))
    times = r.timesteps
    n = len(times)

    def add_noise(x0, z, t):
        ab = sampling.alpha_bar(bb, t)
        return ab**0.5 * x0 + (1 - ab) ** 0.5 * z

    m1, m2 = (mu1 > 0).float(), (mu2 > 0).float()
    z = (add_noise(src, z1, times[0]) * m1 + add_noise(e1, z2, times[0]) * (1 - m1)) * m2 \
        + add_noise(e2, z3, times[0]) * (1 - m2)
    with torch.no_grad():
        for i, t in enumerate(times):
            if i > 0:
                m1, m2 = (mu1 > i / n).float(), (mu2 > i / n).float()
                z = (add_noise(src, z1, t) * m1 + z * (1 - m1)) * m2 + z * (1 - m2)
            nxt = times[i + 1] if i + 1 < n else None
            z = sampling.ddim_step(z, bb.eps(z, t), sampling.alpha_bar(bb, t),
                                   sampling.alpha_bar(bb, nxt))
    assert torch.allclose(r.state, z, atol=1e-5)


def test_seed_determinism_and_generators_differ(pixel_bb):
    src, ex = _states(pixel_bb, 2)
    mu = _half_map(16, 16) * 0.7

    def run(seed):
        return pixels_edit(pixel_bb, src, [ex], [mu],
                           PixelsConfig(strength=0.5, threshold="sigmoid"),
                           generator=_gen(seed), grid=STEPS).state

    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_inverse_polarity_and_iterative(pixel_bb):
    src, e1, e2 = _states(pixel_bb, 3)
    mu = _half_map(16, 16)
    a = pixels_edit(pixel_bb, src, [e1], [mu], PixelsConfig(strength=0.5),
                    generator=_gen(1), grid=STEPS)
    b = pixels_edit(pixel_bb, src, [e1], [1 - mu], PixelsConfig(strength=0.5, invert_maps=True),
                    generator=_gen(1), grid=STEPS)
    assert torch.equal(a.state, b.state)
    res = pixels_iterative(pixel_bb, src, [e1, e2], [mu, _half_map(16, 16, False)],
                           PixelsConfig(strength=0.5),
                           generator=_gen(2), grid=STEPS)
    assert len(res) == 2 and res[0].state.shape == src.shape


def test_guidance_on_sd(sd_bb):
    src, ex = _states(sd_bb, 2)
    mu = _half_map(*sd_bb.state_shape[-2:])
    kw = dict(generator=_gen(1), grid=5)
    r = pixels_edit(sd_bb, src, [ex], [mu], PixelsConfig(strength=0.5, guidance_scale=3.0),
                    cond=sd_bb.condition("a cat"), uncond=sd_bb.condition(""), **kw)
    assert bool(torch.isfinite(r.state).all())
    with pytest.raises(InputError, match="guidance_scale"):
        pixels_edit(sd_bb, src, [ex], [mu], PixelsConfig(strength=0.5, guidance_scale=3.0), **kw)


def test_input_errors(pixel_bb):
    src, ex = _states(pixel_bb, 2)
    mu = torch.ones(16, 16)
    with pytest.raises(InputError, match="maps"):
        pixels_edit(pixel_bb, src, [ex, ex], [mu], generator=_gen())
    with pytest.raises(InputError, match="generator"):
        pixels_edit(pixel_bb, src, [ex], [mu], generator=None)
    with pytest.raises(InputError, match="maps\\[0\\]"):
        pixels_edit(pixel_bb, src, [ex], [mu * 2], generator=_gen())
    with pytest.raises(InputError, match="exemplars"):
        pixels_edit(pixel_bb, src, [], [], generator=_gen())
    with pytest.raises(InputError, match="exemplars\\[0\\]"):
        pixels_edit(pixel_bb, src, [torch.zeros(1, 3, 8, 8)], [mu], generator=_gen())
    with pytest.raises(InputError, match="steps"):
        pixels_edit(pixel_bb, src, [ex], [mu], generator=_gen(), grid=0)


# ------------------------------------------------------------------------------ CLI
def _png(path, arr):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.asarray(arr, dtype=np.uint8)).save(path)
    return path


def test_cli_exemplar_two_exemplars(cli, tiny, image, tmp_path):
    import json

    import numpy as np

    from diffgeo.cli import app

    rng = np.random.default_rng(1)
    e1 = _png(tmp_path / "e1.png", rng.integers(0, 256, (20, 30, 3)))
    e2 = _png(tmp_path / "e2.png", rng.integers(0, 256, (8, 8, 3)))
    m1 = np.full((20, 30), 255)
    m1[:, :10] = 0
    m2 = np.full((20, 30), 255)
    m2[10:, 20:] = 0
    p1, p2 = _png(tmp_path / "m1.png", m1), _png(tmp_path / "m2.png", m2)
    out = tmp_path / "out"
    args = ["exemplar", str(image), "--exemplar", str(e1), "--map", str(p1), "--exemplar",
            str(e1), "--map", str(p2), "--model", str(tiny), "--fit", "crop", "--steps", "10",
            "--strength", "0.6", "--threshold", "cubic", "--out", str(out)]
    r = cli.invoke(app, args)
    assert r.exit_code == 0, r.output
    for name in ("result.png", "maps.png", "masks.png", "composite.png", "settings.json"):
        assert (out / name).exists()
    s = json.loads((out / "settings.json").read_text())
    assert s["t_start"] == 500 and len(s["executed_timesteps"]) == 6  # int(10·0.6) steps
    # placement and the iterative mode
    r = cli.invoke(app, ["exemplar", str(image), "--exemplar", str(e2), "--map", str(p1),
                         "--place", "2,3,0.5", "--iterative", "--model", str(tiny), "--fit",
                         "crop", "--steps", "5", "--out", str(tmp_path / "o2")])
    assert r.exit_code == 0, r.output
    # clear errors
    r = cli.invoke(app, ["exemplar", str(image), "--exemplar", str(e1), "--model", str(tiny),
                         "--fit", "crop", "--out", str(tmp_path / "o3")])
    assert r.exit_code == 2 and "--map" in r.output
    r = cli.invoke(app, ["exemplar", str(image), "--exemplar", str(e1), "--map", str(e2),
                         "--model", str(tiny), "--fit", "crop", "--out", str(tmp_path / "o4")])
    assert r.exit_code == 2 and "--map 1" in r.output
    r = cli.invoke(app, ["exemplar", str(image), "--exemplar", str(e1), "--map", str(p1),
                         "--threshold", "bogus", "--model", str(tiny), "--fit", "crop",
                         "--out", str(tmp_path / "o5")])
    assert r.exit_code == 2 and "threshold" in r.output
    r = cli.invoke(app, ["exemplar", str(image), "--exemplar", str(e1), "--map", str(p1),
                         "--prompt", "a cat", "--model", str(tiny), "--fit", "crop",
                         "--out", str(tmp_path / "o6")])
    assert r.exit_code == 2 and "prompt" in r.output


def test_exemplar_edit_on_a_latent_model_with_guidance(sd_bb, tmp_path):
    import numpy as np

    from diffgeo import verbs

    rng = np.random.default_rng(2)
    src = _png(tmp_path / "s.png", rng.integers(0, 256, (16, 16, 3)))
    ex = _png(tmp_path / "e.png", rng.integers(0, 256, (16, 16, 3)))
    m = np.full((16, 16), 255)
    m[4:12, 4:12] = 0
    mp = _png(tmp_path / "m.png", m)
    res = verbs.run("exemplar", backbone=sd_bb, source=src, exemplar=(ex,), map=(mp,),
                    strength=0.5, steps=5, prompt="a cat", guidance_scale=2.0,
                    out=tmp_path / "o")
    assert res.image.shape == (1, 3, 16, 16)
    used = res.passes[0].maps
    assert used.shape == (1, 1, 8, 8) and float(used[0, 0, 4, 4]) == 0.0
    assert (tmp_path / "o" / "masks.png").exists()


@pytest.mark.parametrize("model", ["pixel", "sd"])
@pytest.mark.parametrize("steps, strength", [(50, 0.8), (50, 0.33), (10, 0.6), (25, 1.0)])
def test_executed_steps_equal_diffusers_img2img(steps, strength, model, request):
    """The same strength runs the same timesteps as StableDiffusionImg2ImgPipeline with the
    model's own scheduler config (the SD fixture has steps_offset=1: 981, 961, ...)."""
    import json

    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    bb = request.getfixturevalue(f"{model}_bb")
    path = request.getfixturevalue(f"{model}_path")
    cfg = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    sched = DDIMScheduler.from_config(cfg)
    sched.set_timesteps(steps)
    pipe = StableDiffusionImg2ImgPipeline.__new__(StableDiffusionImg2ImgPipeline)
    pipe.scheduler = sched
    theirs, n = pipe.get_timesteps(steps, strength, "cpu")
    t, ours = edit_start(bb, strength, steps)
    assert ours == [int(v) for v in theirs] and len(ours) == n and t == ours[0]
