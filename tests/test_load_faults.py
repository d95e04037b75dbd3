"""Broken model and directions folders: every fault is one `error:` line naming the file.

Each model fault is a copy of the tiny pixel pipeline with one thing wrong, checked twice: the
exception ``load_backbone`` raises (class and message) and what `diffgeo info` prints (exit 2, a
single stderr line, no traceback). Directions faults are checked the same way through
``Directions.load`` and `diffgeo apply`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import _assert_user_error
from safetensors.torch import load_file, save_file

from diffgeo.backbones import PixelBackbone, load_backbone
from diffgeo.cli import app
from diffgeo.editing.rbe import Directions
from diffgeo.errors import InputError, ModelNotFoundError

ENV = {"COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_W = f"unet/{WEIGHTS}"


def _copy(src: Path, tmp_path: Path, name: str = "model") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))


_DROP = object()
BAD_JSON = '{\n  "a": 1,\n  "b": ,\n}'  # the value of "b" is missing: line 3, column 8


def _invoke(cli, args) -> object:
    return cli.invoke(app, [str(a) for a in args], env=ENV)


def _one_error_line(result, *fragments: str) -> str:
    """_assert_user_error, and nothing else on stderr (no warning from a library either)."""
    line = _assert_user_error(result, *fragments)
    assert [ln for ln in re.split(r"[\r\n]+", result.stderr) if ln.strip()] == [line]
    return line


# ------------------------------------------------------------------------------ model faults
def _truncate(p: Path) -> None:
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


def _random_bytes(p: Path) -> None:
    p.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                dtype=torch.uint8).numpy().tobytes())


def _drop_tensors(p: Path) -> None:
    t = load_file(p)
    save_file({k: v for i, (k, v) in enumerate(sorted(t.items())) if i % 2}, p)


# (id, how the folder is broken, exception class, regex on the message)
MODEL_FAULTS = [
    ("truncated", lambda m: _truncate(m / UNET_W), InputError,
     rf"{re.escape(UNET_W)} is truncated: \d+ bytes, its header needs \d+"),
    ("zero-bytes", lambda m: (m / UNET_W).write_bytes(b""), InputError,
     rf"{re.escape(UNET_W)} is empty \(0 bytes\)"),
    ("random-bytes", lambda m: _random_bytes(m / UNET_W), InputError,
     rf"{re.escape(UNET_W)} is not a safetensors file"),
    ("git-lfs-pointer", lambda m: (m / UNET_W).write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 724004\n"),
     InputError, rf"{re.escape(UNET_W)} is a Git LFS pointer, not the weights: .*git lfs pull"),
    ("weights-are-a-folder", lambda m: ((m / UNET_W).unlink(), (m / UNET_W).mkdir()),
     InputError, rf"{re.escape(UNET_W)} is a folder, not a weights file"),
    ("shape-mismatch", lambda m: _edit_json(m / "unet/config.json", block_out_channels=[32, 64]),
     InputError, rf"{re.escape(UNET_W)} does not match .*unet/config\.json: conv_in\.weight has "
                 r"shape \[16, 3, 3, 3\] in the weights but \[32, 3, 3, 3\] in the model the "
                 r"config describes \(and \d+ more tensors\)"),
    ("missing-tensors", lambda m: _drop_tensors(m / UNET_W), InputError,
     rf"{re.escape(UNET_W)} lacks 72 of the 144 tensors .*unet/config\.json describes, e\.g\. "),
    ("no-weights", lambda m: (m / UNET_W).unlink(), ModelNotFoundError,
     r"has no unet weights"),
    ("index-json", lambda m: (m / "model_index.json").write_text(BAD_JSON), InputError,
     r"pipeline index .*model_index\.json is not valid JSON: Expecting value at line 3, "
     r"column 8"),
    ("unet-json", lambda m: (m / "unet/config.json").write_text(BAD_JSON), InputError,
     r"unet config .*unet/config\.json is not valid JSON: Expecting value at line 3, column 8"),
    ("scheduler-json", lambda m: (m / "scheduler/scheduler_config.json").write_text(BAD_JSON),
     InputError, r"scheduler config .*scheduler/scheduler_config\.json is not valid JSON: "
                 r"Expecting value at line 3, column 8"),
    ("index-not-object", lambda m: (m / "model_index.json").write_text("[1, 2]"), InputError,
     r"model_index\.json holds a JSON array, expected an object"),
    ("index-entry", lambda m: _edit_json(m / "model_index.json", unet="UNet2DModel"), InputError,
     r"model_index\.json: 'unet' must be \[library, class name\]"),
    ("index-unknown-class", lambda m: _edit_json(m / "model_index.json",
                                                 unet=["diffusers", "FooModel"]),
     InputError, r"model_index\.json gives unet as 'FooModel'; diffgeo loads a UNet2DModel"),
    ("config-unknown-class", lambda m: _edit_json(m / "unet/config.json", _class_name="FooModel"),
     InputError, r"unet/config\.json describes a FooModel, expected a UNet2DModel"),
    ("config-missing-field", lambda m: _edit_json(m / "unet/config.json", sample_size=_DROP),
     InputError, r"unet/config\.json has no sample_size: the image size"),
    ("config-bad-value", lambda m: _edit_json(m / "unet/config.json",
                                              down_block_types=["NoSuchBlock2D", "DownBlock2D"]),
     InputError, r"unet/config\.json does not describe a valid UNet2DModel: .*NoSuchBlock2D"),
    ("config-missing", lambda m: (m / "unet/config.json").unlink(), ModelNotFoundError,
     r"unet/config\.json is missing"),
    ("out-channels", lambda m: _edit_json(m / "unet/config.json", out_channels=5), InputError,
     r"unet/config\.json: out_channels 5 with in_channels 3"),
    ("scheduler-missing", lambda m: (m / "scheduler/scheduler_config.json").unlink(),
     ModelNotFoundError, r"scheduler config not found: .*scheduler_config\.json"),
    ("scheduler-field-type", lambda m: _edit_json(m / "scheduler/scheduler_config.json",
                                                  num_train_timesteps="1000"),
     InputError, r"scheduler_config\.json: num_train_timesteps must be an integer, got \"1000\""),
    ("scheduler-null", lambda m: _edit_json(m / "scheduler/scheduler_config.json",
                                            beta_end=None),
     InputError, r"scheduler_config\.json: beta_end must be a number, got null"),
    ("scheduler-betas", lambda m: _edit_json(m / "scheduler/scheduler_config.json",
                                             beta_end=2.0),
     InputError, r"scheduler_config\.json: its betas give alpha_bar outside \(0, 1\]"),
]


@pytest.mark.parametrize("fault, exc, pattern", [f[1:] for f in MODEL_FAULTS],
                         ids=[f[0] for f in MODEL_FAULTS])
def test_broken_model_folder_is_one_error_naming_the_file(tiny, tmp_path, cli, fault, exc,
                                                          pattern):
    folder = _copy(tiny, tmp_path)
    fault(folder)
    with pytest.raises(exc, match=pattern) as info:
        load_backbone(folder)
    assert type(info.value) is exc
    line = _one_error_line(_invoke(cli, ["info", folder]))
    assert re.search(pattern, line), line
    assert str(folder) in line


def test_bare_unet_folder_faults(bare_unet_path, tmp_path, cli):
    trunc = _copy(bare_unet_path, tmp_path, "trunc")
    _truncate(trunc / WEIGHTS)
    with pytest.raises(InputError, match=rf"{re.escape(str(trunc / WEIGHTS))} is truncated"):
        load_backbone(trunc)
    nocls = _copy(bare_unet_path, tmp_path, "nocls")
    _edit_json(nocls / "config.json", _class_name=_DROP)
    _one_error_line(_invoke(cli, ["info", nocls]), "config.json has no _class_name, expected a "
                                                   "UNet2DModel")
    badjson = _copy(bare_unet_path, tmp_path, "badjson")
    (badjson / "scheduler_config.json").write_text(BAD_JSON)
    _one_error_line(_invoke(cli, ["info", badjson]), "scheduler_config.json is not valid JSON: "
                                                     "Expecting value at line 3, column 8")


def test_model_path_that_is_a_file(tiny, cli):
    weights = tiny / UNET_W
    _one_error_line(_invoke(cli, ["info", weights]), f"{weights} is a file")


@pytest.mark.parametrize("fault, fragment", [
    (lambda m: _truncate(m / UNET_W), "is truncated"),
    (lambda m: _edit_json(m / "unet/config.json", block_out_channels=[32, 64]),
     "conv_in.weight has shape [16, 3, 3, 3] in the weights but [32, 3, 3, 3]"),
], ids=["truncated", "shape-mismatch"])
def test_invert_with_a_broken_model(tiny, image, tmp_path, cli, fault, fragment):
    folder = _copy(tiny, tmp_path)
    fault(folder)
    out = tmp_path / "out"
    result = _invoke(cli, ["invert", image, "--model", folder, "--t", "500", "--steps", "2",
                           "--fit", "crop", "--out", out])
    _one_error_line(result, str(folder), fragment)
    assert not out.exists()  # refused before anything was written


def test_pickle_faults(tiny, tmp_path):
    # allow_pickle=True prefers safetensors and falls back to the pickle, as diffusers does.
    st_only = load_backbone(tiny, allow_pickle=True)
    assert isinstance(st_only, PixelBackbone)
    folder = _copy(tiny, tmp_path)
    st = folder / UNET_W
    torch.save(load_file(st), st.with_suffix(".bin"))
    st.unlink()
    _truncate(st.with_suffix(".bin"))
    with pytest.raises(InputError, match=r"diffusion_pytorch_model\.bin is not a readable "
                                         r"PyTorch checkpoint \(truncated or corrupt\)"):
        load_backbone(folder, allow_pickle=True)


def test_old_attention_names_still_load(tiny, pixel_bb, tmp_path):
    """Checkpoints from before diffusers renamed attention (query/key/value/proj_attn, as in
    google/ddpm-*) are renamed on load, so the completeness check must not refuse them."""
    folder = _copy(tiny, tmp_path)
    t = load_file(folder / UNET_W)
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(k: str) -> str:
        for new, legacy in old.items():
            k = k.replace(new, legacy)
        return k

    renamed = {rename(k): v for k, v in t.items()}
    assert sum(k != rename(k) for k in t) >= 8  # the tiny model has attention blocks
    save_file(renamed, folder / UNET_W)
    loaded = load_backbone(folder).unet.state_dict()
    reference = pixel_bb.unet.state_dict()  # pixel_path holds the same seeded weights as tiny
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[k], reference[k]) for k in reference)


def test_sharded_weights_are_checked_shard_by_shard(tiny, pixel_bb, tmp_path):
    folder = _copy(tiny, tmp_path)
    t = load_file(folder / UNET_W)
    (folder / UNET_W).unlink()
    names = sorted(t)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        save_file({k: t[k] for k in keys}, folder / "unet" / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (folder / f"unet/{WEIGHTS}.index.json").write_text(json.dumps(index))
    loaded = load_backbone(folder).unet.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in pixel_bb.unet.state_dict().items())
    _truncate(folder / "unet" / next(iter(shards)))
    with pytest.raises(InputError, match=r"00001-of-00002\.safetensors is truncated"):
        load_backbone(folder)
    (folder / "unet" / next(iter(shards))).unlink()
    with pytest.raises(ModelNotFoundError, match=r"index\.json lists diffusion_pytorch_model-"
                                                 r"00001-of-00002\.safetensors, which is not in"):
        load_backbone(folder)


def test_learned_variance_pixel_model_uses_the_eps_half(tmp_path):
    """out_channels = 2 x in_channels (ε, then the variance): ε is the first half, in the full
    pass and in the encode/decode path the h-space methods use."""
    from diffusers import DDPMScheduler, UNet2DModel

    from diffgeo.train import MODEL_PRESETS, export_model

    with torch.random.fork_rng():
        torch.manual_seed(3)
        unet = UNet2DModel(**{**MODEL_PRESETS["tiny-16"], "out_channels": 6})
    folder = export_model(unet, tmp_path / "learned")
    DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range").save_pretrained(
        folder / "scheduler")
    bb = load_backbone(folder)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = bb.unet(x, torch.tensor([250, 250])).sample
        eps = bb.eps(x, 250)
        enc = bb.encode(x, 250)
        via_h = bb.eps_from_h(x, 250, enc.h, encoded=enc)
    assert full.shape == (2, 6, 16, 16) and eps.shape == (2, 3, 16, 16)
    assert torch.equal(eps, full[:, :3])
    torch.testing.assert_close(via_h, eps, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ SD folders
SD_FAULTS = [
    ("vae-truncated", lambda m: _truncate(m / "vae" / WEIGHTS),
     r"vae/diffusion_pytorch_model\.safetensors is truncated"),
    ("text-encoder-json", lambda m: (m / "text_encoder/config.json").write_text(BAD_JSON),
     r"text_encoder/config\.json is not valid JSON: Expecting value at line 3, column 8"),
    ("text-encoder-shape", lambda m: _edit_json(m / "text_encoder/config.json", hidden_size=32),
     r"text_encoder/model\.safetensors does not match .*text_encoder/config\.json: "),
    ("tokenizer-json", lambda m: (m / "tokenizer/vocab.json").write_text(BAD_JSON),
     r"tokenizer file .*tokenizer/vocab\.json is not valid JSON"),
    ("unknown-encoder-class", lambda m: _edit_json(m / "model_index.json",
                                                   text_encoder=["transformers", "NoSuchModel"]),
     r"model_index\.json gives text_encoder as 'NoSuchModel', which is not a class of "
     r"transformers"),
    ("learned-variance-latent", lambda m: _edit_json(m / "unet/config.json", out_channels=8),
     r"unet/config\.json: out_channels 8 is twice in_channels 4: a learned-variance latent "
     r"model, not supported yet \(issue 19\)"),
]


@pytest.mark.parametrize("fault, pattern", [f[1:] for f in SD_FAULTS],
                         ids=[f[0] for f in SD_FAULTS])
def test_broken_sd_folder(sd_path, tmp_path, fault, pattern):
    folder = _copy(sd_path, tmp_path)
    fault(folder)
    with pytest.raises(InputError, match=pattern):
        load_backbone(folder)


# ------------------------------------------------------------------------------ directions
@pytest.fixture(scope="module")
def discovered(tiny, tmp_path_factory, cli):
    """`diffgeo directions --out DIR` on the tiny model, smallest settings."""
    from conftest import save_rgb

    root = tmp_path_factory.mktemp("dirs")
    img = save_rgb(root / "img.png", 16, 16, seed=1)
    out = root / "found"
    r = _invoke(cli, ["directions", img, "--model", tiny, "--box", "4,4,10,10", "--steps", "2",
                      "--k", "1", "--preview=10", "--out", out])
    assert r.exit_code == 0, r.output
    return img, out


def test_apply_takes_the_folder_directions_wrote(discovered, tiny, tmp_path, cli):
    img, out = discovered
    images = {}
    for name, given in (("outer", out), ("inner", out / "directions")):
        dest = tmp_path / name
        r = _invoke(cli, ["apply", img, "--model", tiny, "--directions", given, "--strength=10",
                          "--out", dest])
        assert r.exit_code == 0, r.output
        images[name] = (dest / "edit-0.png").read_bytes()
        assert json.loads((dest / "settings.json").read_text())["directions"] == str(given)
    assert images["outer"] == images["inner"]
    assert Directions.load(out).source == out / "directions" / "directions.safetensors"


def _other_model_vectors(d: Path) -> None:
    """Directions as another model (h of shape (16, 4, 4)) would have written them."""
    t = load_file(d / "directions.safetensors")
    k = t["vectors"].shape[0]
    t.update(vectors=torch.ones(k, 16, 4, 4) / 16, raw_vectors=torch.ones(k, 16, 4, 4) / 16)
    t.pop("unmasked_vectors", None)
    t.pop("unmasked_values", None)
    save_file(t, d / "directions.safetensors")
    _edit_json(d / "directions.json", h_shape=[16, 4, 4])


TENSORS, META = "directions.safetensors", "directions.json"
DIRECTION_FAULTS = [
    ("truncated", lambda d: _truncate(d / TENSORS), rf"{TENSORS} is truncated"),
    ("random-bytes", lambda d: _random_bytes(d / TENSORS), rf"{TENSORS} is not a safetensors"),
    ("no-metadata", lambda d: (d / META).unlink(),
     rf"{META} is missing: a directions folder holds both"),
    ("no-tensors", lambda d: (d / TENSORS).unlink(),
     rf"{TENSORS} is missing: a directions folder holds both"),
    ("bad-json", lambda d: (d / META).write_text(BAD_JSON),
     rf"directions metadata .*{META} is not valid JSON: Expecting value at line 3, column 8"),
    ("format", lambda d: _edit_json(d / META, format="something-else"),
     rf"{META} has format 'something-else'"),
    ("mixed-runs", lambda d: _edit_json(d / META, k=5),
     rf"{META} gives k 5 but .*{TENSORS} holds 1: the two files come from different runs"),
    ("missing-tensor", lambda d: save_file({"vectors": torch.zeros(1, 3)}, d / TENSORS),
     rf"{TENSORS} has no tensor 'raw_vectors'"),
    ("inconsistent", lambda d: save_file(
        {"vectors": torch.zeros(2, 3), "raw_vectors": torch.zeros(2, 4),
         "singular_values": torch.zeros(2)}, d / TENSORS),
     rf"{TENSORS}: raw_vectors has shape \[2, 4\], expected \[2, 3\]"),
]


@pytest.mark.parametrize("fault, pattern", [f[1:] for f in DIRECTION_FAULTS],
                         ids=[f[0] for f in DIRECTION_FAULTS])
def test_broken_directions_folder(discovered, tiny, tmp_path, cli, fault, pattern):
    img, out = discovered
    found = _copy(out, tmp_path, "found")
    fault(found / "directions")
    with pytest.raises(InputError, match=pattern):
        Directions.load(found)
    line = _one_error_line(_invoke(cli, ["apply", img, "--model", tiny, "--directions", found,
                                         "--out", tmp_path / "apply"]))
    assert re.search(pattern, line), line
    assert str(found / "directions") in line


def test_directions_of_another_model(discovered, tiny, tmp_path, cli):
    img, out = discovered
    found = _copy(out, tmp_path, "found")
    _other_model_vectors(found / "directions")
    assert Directions.load(found).h_shape == (16, 4, 4)  # a sound file, for another model
    _one_error_line(_invoke(cli, ["apply", img, "--model", tiny, "--directions", found,
                                  "--out", tmp_path / "apply"]),
                    f"the directions in {found / 'directions' / TENSORS} have h shape "
                    "(16, 4, 4) but this backbone's h is (32, 8, 8): they were found with "
                    "another model")


@pytest.mark.parametrize("given, fragment", [
    ("nowhere", "is not a directions folder: it does not exist"),
    ("settings.json", "is not a directions folder: it is a file"),
    ("empty", "is not a directions folder"),
])
def test_directions_path_that_is_not_a_directions_folder(discovered, tiny, tmp_path, cli,
                                                         given, fragment):
    img, out = discovered
    (tmp_path / "empty").mkdir()
    path = out / given if given == "settings.json" else tmp_path / given
    _one_error_line(_invoke(cli, ["apply", img, "--model", tiny, "--directions", path,
                                  "--out", tmp_path / "apply"]), str(path), fragment)
