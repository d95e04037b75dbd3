"""Dataset recipes in benchmarks/recipes: job files from tiny fake datasets in each documented
layout, clear one-line errors for bad layouts, and one end-to-end run on a tiny model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import save_box_mask, save_rgb
from PIL import Image

from diffgeo.batch import read_jobs

RECIPES = Path(__file__).resolve().parents[1] / "benchmarks" / "recipes"


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", RECIPES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def lines(path: Path) -> list[dict]:
    return [json.loads(s) for s in path.read_text().splitlines() if s.strip()]


def check_valid(path: Path, n: int) -> None:
    jobs = read_jobs(path)
    assert len(jobs) == n
    assert all(j.error is None for j in jobs), [j.error for j in jobs if j.error]


# ------------------------------------------------------------------------------- Emu Edit
@pytest.fixture
def emu_data(tmp_path) -> Path:
    data = tmp_path / "emu"
    rows = []
    for i in range(6):
        save_rgb(data / "images" / f"{i}.png", seed=i)
        # mask 3 has another size than its image: the recipe resizes it
        size = (10, 12) if i == 3 else (20, 24)
        save_box_mask(data / "masks" / f"{i}.png", *size, box=(2, 3, 6, 7))
        rows.append({"id": f"e{i}", "image": f"images/{i}.png", "mask": f"masks/{i}.png",
                     "instruction": f"remove object {i}",
                     "task": "background" if i == 5 else "remove"})
    rows[1]["reference"] = [1, 2]
    (data / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def test_emu_jobs(emu_data, tmp_path):
    emu = recipe("emu_edit_removal")
    plan = emu.write_jobs(emu_data, tmp_path / "out", model="m", seed=0, limit=None,
                          iterations=5, steps=10)
    got = lines(tmp_path / "out" / "JOBS.jsonl")
    assert [j["id"] for j in got] == [f"remove-e{i}" for i in range(5)]  # task 5 left out
    assert {j["verb"] for j in got} == {"remove"}
    assert got[0]["image"] == str(emu_data / "images" / "0.png")
    assert got[0]["mask"] == str(emu_data / "masks" / "0.png")
    assert got[1]["reference"] == [1, 2] and "reference" not in got[0]
    assert all(j["iterations"] == 5 and j["steps"] == 10 and j["model"] == "m"
               and j["fit"] == "crop" for j in got)
    resized = Path(got[3]["mask"])
    assert resized.parent == tmp_path / "out" / "inputs" / "masks"
    assert Image.open(resized).size == (24, 20)
    assert plan.extras["remove-e2"]["text"] == "remove object 2"
    check_valid(tmp_path / "out" / "JOBS.jsonl", 5)


def test_emu_limit_is_seeded_subset(emu_data, tmp_path):
    emu = recipe("emu_edit_removal")
    a = emu.write_jobs(emu_data, tmp_path / "a", limit=3, seed=1)
    b = emu.write_jobs(emu_data, tmp_path / "b", limit=3, seed=1)
    ids = [j["id"] for j in a.jobs]
    assert len(ids) == 3 and ids == [j["id"] for j in b.jobs]
    assert ids == sorted(ids)  # the subset keeps the index order
    seeds = {tuple(j["id"] for j in emu.write_jobs(emu_data, tmp_path / f"s{s}", limit=3,
                                                   seed=s).jobs) for s in range(6)}
    assert len(seeds) > 1  # the seed picks the subset


def test_emu_csv_index(tmp_path):
    emu = recipe("emu_edit_removal")
    data = tmp_path / "emu"
    save_rgb(data / "a.jpg")
    save_box_mask(data / "a-mask.png")
    (data / "index.csv").write_text("id,image,mask,instruction,reference\n"
                                    "x/1,a.jpg,a-mask.png,Remove the cup,\"3,4\"\n")
    plan = emu.write_jobs(data, tmp_path / "out")
    assert plan.jobs[0]["id"] == "remove-x-1" and plan.jobs[0]["reference"] == [3, 4]
    check_valid(plan.files[0], 1)


# ------------------------------------------------------------------------------- iHarmony4
@pytest.fixture
def iharmony(tmp_path) -> Path:
    root = tmp_path / "iHarmony4"
    listed = {"HCOCO": ["c1_1_1.jpg", "c1_1_2.jpg", "c2_1_1.jpg", "missing_1_1.jpg"],
              "Hday2night": ["d9-2_3_1.jpg"]}
    for subset, names in listed.items():
        for name in names:
            if name.startswith("missing"):
                continue
            save_rgb(root / subset / "composite_images" / name)
            stem = name.rsplit("_", 1)[0]
            save_box_mask(root / subset / "masks" / f"{stem}.png")
            save_rgb(root / subset / "real_images" / f"{stem.rsplit('_', 1)[0]}.jpg")
        (root / subset / f"{subset}_test.txt").write_text("\n".join(names) + "\n")
    return root


def test_iharmony_jobs(iharmony, tmp_path):
    ih = recipe("iharmony4_blending")
    assert ih.mask_name("d9-2_3_1.jpg") == "d9-2_3.png"
    assert ih.mask_name("a_b_1_2.jpg") == "a_b_1.png"
    plan = ih.write_jobs(iharmony, tmp_path / "out", limit=None, iterations=7)
    got = lines(tmp_path / "out" / "JOBS.jsonl")
    assert [j["id"] for j in got] == ["blend-HCOCO-c1_1_1", "blend-HCOCO-c1_1_2",
                                      "blend-HCOCO-c2_1_1", "blend-Hday2night-d9-2_3_1"]
    assert got[1]["image"] == str(iharmony / "HCOCO" / "composite_images" / "c1_1_2.jpg")
    assert got[1]["mask"] == str(iharmony / "HCOCO" / "masks" / "c1_1.png")
    assert all(j["verb"] == "blend" and j["iterations"] == 7 for j in got)
    assert plan.extras[got[0]["id"]]["text"] == ih.TEXT
    check_valid(plan.files[0], 4)
    one = ih.write_jobs(iharmony, tmp_path / "one", subsets=["Hday2night"])
    assert [j["id"] for j in one.jobs] == ["blend-Hday2night-d9-2_3_1"]
    two = ih.write_jobs(iharmony, tmp_path / "two", limit=2, seed=3)
    assert [j["id"] for j in two.jobs] == [j["id"] for j in
                                           ih.write_jobs(iharmony, tmp_path / "t2", limit=2,
                                                         seed=3).jobs]
    assert len(two.jobs) == 2


# ------------------------------------------------------------------------------- CelebA-HQ
@pytest.fixture
def celeba(tmp_path) -> Path:
    root = tmp_path / "CelebAMask-HQ"
    for i in (0, 1, 2001, 7):
        save_rgb(root / "CelebA-HQ-img" / f"{i}.jpg", 32, 32, seed=i)
        anno = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        save_box_mask(anno / f"{i:05d}_l_eye.png", 16, 16, box=(4, 3, 6, 6))
        if i != 7:  # image 7 has no right eye and no mouth
            save_box_mask(anno / f"{i:05d}_r_eye.png", 16, 16, box=(4, 10, 6, 13))
            save_box_mask(anno / f"{i:05d}_mouth.png", 16, 16, box=(11, 5, 13, 11))
    return root


def test_celebahq_jobs(celeba, tmp_path):
    cr = recipe("celebahq_regions")
    out = tmp_path / "out"
    plan = cr.write_jobs(celeba, out, limit=None, steps=10, k=2, strength=20)
    d = lines(out / "JOBS-1-directions.jsonl")
    a = lines(out / "JOBS-2-apply.jsonl")
    assert [j["id"] for j in d] == ["directions-eyes-00000", "directions-eyes-00001",
                                    "directions-eyes-00007", "directions-eyes-02001",
                                    "directions-mouth-00000", "directions-mouth-00001",
                                    "directions-mouth-02001"]
    assert [j["id"] for j in a] == [j["id"].replace("directions", "apply") for j in d]
    assert d[0]["image"] == str(celeba / "CelebA-HQ-img" / "0.jpg")
    assert d[0]["k"] == 2 and d[0]["t"] == 500 and d[0]["steps"] == 10
    assert a[3]["directions"] == str(out / "results" / "directions-eyes-02001" / "directions")
    assert a[0]["strength"] == [-20.0, 20.0] and a[0]["mask"] == d[0]["mask"]
    # the eye region: union of both eyes, at the image's size
    m = np.asarray(Image.open(d[0]["mask"]))
    assert m.shape == (32, 32) and m[9, 7] == 255 and m[9, 21] == 255 and m[0, 0] == 0
    m7 = np.asarray(Image.open(d[2]["mask"]))
    assert m7[9, 7] == 255 and m7[9, 21] == 0
    check_valid(plan.files[0], 7)
    check_valid(plan.files[1], 7)


def test_celebahq_shared_and_regions(celeba, tmp_path):
    cr = recipe("celebahq_regions")
    regions = cr.parse_regions("lips=u_lip+mouth,hair")
    assert regions == {"lips": ("u_lip", "mouth"), "hair": ("hair",)}
    assert cr.parse_regions("eyes") == {"eyes": ("l_eye", "r_eye")}
    plan = cr.write_jobs(celeba, tmp_path / "o", limit=2, seed=5, shared=True,
                         regions={"eyes": cr.REGIONS["eyes"]})
    d, a = lines(plan.files[0]), lines(plan.files[1])
    assert len(d) == 1 and len(a) == 2
    assert {j["directions"] for j in a} == {str(tmp_path / "o" / "results" / d[0]["id"] /
                                                 "directions")}
    again = cr.write_jobs(celeba, tmp_path / "p", limit=2, seed=5, shared=True,
                          regions={"eyes": cr.REGIONS["eyes"]})
    assert [j["image"] for j in again.jobs] == [j["image"] for j in plan.jobs]


# ------------------------------------------------------------------------------- ImageNet
@pytest.fixture
def imagenet(tmp_path) -> Path:
    root = tmp_path / "val"
    for c, wnid in enumerate(("n01440764", "n01443537")):
        for k in range(3):
            save_rgb(root / wnid / f"ILSVRC2012_val_{c}{k}.JPEG", 20 + k, 24, seed=10 * c + k)
    return root


def test_imagenet_pairs(imagenet, tmp_path):
    ie = recipe("imagenet_exemplars")
    plan = ie.write_jobs(imagenet, tmp_path / "out", limit=8, seed=3, strength=0.6)
    got = lines(tmp_path / "out" / "JOBS.jsonl")
    assert [j["id"] for j in got] == [f"pair-{n:05d}" for n in range(8)]
    for j in got:
        assert j["verb"] == "exemplar" and j["strength"] == 0.6
        assert j["source"] != j["exemplar"][0]
        assert Path(j["source"]).suffix == ".JPEG" and Path(j["source"]).parent.parent == imagenet
        mp = np.asarray(Image.open(j["map"][0]))
        assert mp.shape == ie.C.image_size(Path(j["source"]))  # drawn on the source
        assert mp.min() == 0 and mp.max() == 255  # take the exemplar inside, keep outside
        assert plan.extras[j["id"]]["region_invert"] is True
    # the first six sources are a permutation of the six images, then it cycles
    assert len({j["source"] for j in got[:6]}) == 6
    check_valid(plan.files[0], 8)
    same = ie.write_jobs(imagenet, tmp_path / "same", limit=8, seed=3, strength=0.6)
    key = [(j["source"], j["exemplar"]) for j in same.jobs]
    assert key == [(j["source"], j["exemplar"]) for j in got]
    prefix = ie.write_jobs(imagenet, tmp_path / "prefix", limit=3, seed=3)
    assert [(j["source"], j["exemplar"]) for j in prefix.jobs] == key[:3]
    other = ie.write_jobs(imagenet, tmp_path / "other", limit=8, seed=4)
    assert [(j["source"], j["exemplar"]) for j in other.jobs] != key


def test_imagenet_map_folder_and_exemplar_folder(imagenet, tmp_path):
    ie = recipe("imagenet_exemplars")
    maps = tmp_path / "maps"
    save_box_mask(maps / "m0.png", 8, 8, box=(0, 0, 4, 8))
    ex = tmp_path / "ex"
    save_rgb(ex / "one.png")
    plan = ie.write_jobs(imagenet, tmp_path / "out", limit=2, exemplars=ex, maps=maps)
    for j in plan.jobs:
        assert j["exemplar"] == [str(ex / "one.png")]
        m = np.asarray(Image.open(j["map"][0]))
        assert m.shape == ie.C.image_size(Path(j["source"]))
        assert m[0, 0] == 255 and m[-1, -1] == 0
    check_valid(plan.files[0], 2)


# ------------------------------------------------------------------------------- bad layouts
def _one_line_error(excinfo, *fragments: str) -> str:
    msg = str(excinfo.value.code)
    assert msg.startswith("error: ") and "\n" not in msg
    for f in fragments:
        assert f in msg, msg
    return msg


@pytest.mark.parametrize("name, prepare, fragments", [
    ("emu_edit_removal", lambda p: p.mkdir(), ["--data", "index.jsonl"]),
    ("emu_edit_removal", None, ["--data", "not a folder"]),
    ("iharmony4_blending", lambda p: (p / "HCOCO" / "composite_images").mkdir(parents=True),
     ["--data", "HCOCO_test.txt"]),
    ("iharmony4_blending", lambda p: p.mkdir(), ["--data", "composite_images"]),
    ("celebahq_regions", lambda p: (p / "CelebA-HQ-img").mkdir(parents=True),
     ["--data", "CelebAMask-HQ-mask-anno"]),
    ("imagenet_exemplars", lambda p: (p / "n01440764").mkdir(parents=True),
     ["--data", "<wnid>/<file>.JPEG"]),
])
def test_bad_layout_is_one_line_error(tmp_path, name, prepare, fragments):
    mod = recipe(name)
    data = tmp_path / "data"
    if prepare is not None:
        prepare(data)
    with pytest.raises(SystemExit) as ei:
        mod.write_jobs(data, tmp_path / "out")
    _one_line_error(ei, *fragments)


def test_bad_layout_through_main(tmp_path, capsys):
    mod = recipe("emu_edit_removal")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "index.jsonl").write_text(json.dumps({"image": "nope.png",
                                                            "mask": "m.png"}) + "\n")
    with pytest.raises(SystemExit) as ei:
        mod.main(["--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"), "--jobs-only"])
    _one_line_error(ei, "image", "nope.png", "does not exist")


# ------------------------------------------------------------------------------- end to end
def test_celebahq_end_to_end_on_a_tiny_model(celeba, tiny, tmp_path, capsys):
    """Both phases through run_batch, evaluation of the apply jobs, and a resumed rerun that
    skips every finished job."""
    cr = recipe("celebahq_regions")
    out = tmp_path / "run"
    argv = ["--data", str(celeba), "--model", str(tiny), "--out", str(out), "--limit", "1",
            "--regions", "mouth", "--steps", "10", "--k", "1", "--strength", "20",
            "--device", "cpu"]
    plan = cr.write_jobs(celeba, out, model=str(tiny), limit=1, steps=10, k=1, strength=20,
                         regions={"mouth": cr.REGIONS["mouth"]})
    table = cr.C.run_and_evaluate(plan, out, device="cpu")
    printed = capsys.readouterr().out
    assert "1 done" in printed and "failed" in printed
    groups = {r["task"] for r in table}
    assert groups == {"apply (α=-20)", "apply (α=20)"}
    metrics = {r["metric"] for r in table}
    assert {"psnr", "mse", "mse_inside", "mse_outside"} <= metrics
    assert all(r["n"] == 1 for r in table if r["metric"] == "mse")
    assert (out / "results" / "evaluation.json").is_file()
    # a rerun through main() skips both finished jobs
    cr.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("1 skipped") == 2 and "paper:" in printed


# ------------------------------------------------------------------------------- paper metrics
def _fake_job(results: Path, jid: str, spec: dict, source: Path, *, exemplar: bool = False):
    """A finished job folder as the runner leaves it: input/result(/exemplar-1).png, settings
    with the fit, and a valid completion marker."""
    from diffgeo.batch import MARKER, spec_hash
    from diffgeo.io import load_image, to_uint8

    def save_image(x, path):
        Image.fromarray(to_uint8(x)).save(path)

    d = results / jid
    d.mkdir(parents=True)
    x, fit = load_image(source, size=(32, 32), fit="crop")
    save_image(x, d / "input.png")
    save_image((x * 0.5).clamp(-1, 1), d / "result.png")
    if exemplar:
        save_image(-x, d / "exemplar-1.png")
    (d / "settings.json").write_text(json.dumps({"fit": fit.to_dict()}))
    (d / MARKER).write_text(json.dumps({"hash": spec_hash(spec), "spec": spec}))


def test_paper_metrics_use_text_and_fitted_region(tmp_path):
    import torch
    from conftest import _write_tokenizer
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    C = recipe("emu_edit_removal").C
    clip_dir, dino_dir = tmp_path / "clip", tmp_path / "dino"
    tok = _write_tokenizer(clip_dir)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(
            text_config=dict(vocab_size=len(tok.get_vocab()), max_position_embeddings=16,
                             bos_token_id=0, eos_token_id=1, pad_token_id=1, **small),
            vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=16)
        ).save_pretrained(clip_dir, safe_serialization=True)
        ViTModel(ViTConfig(image_size=32, patch_size=8, **small),
                 add_pooling_layer=False).save_pretrained(dino_dir, safe_serialization=True)
    src = save_rgb(tmp_path / "src.png", 40, 48)
    mask = save_box_mask(tmp_path / "mask.png", 40, 48, box=(8, 10, 30, 40))
    results = tmp_path / "results"
    _fake_job(results, "remove-a", {"task": "remove", "image": str(src)}, src)
    _fake_job(results, "pair-0", {"task": "exemplar", "source": str(src)}, src, exemplar=True)
    _fake_job(results, "no-extras", {"task": "remove", "image": str(src)}, src)
    extras = {"remove-a": {"text": "remove the cup", "region": str(mask)},
              "pair-0": {"region": str(mask), "region_invert": True}}
    rows = C.paper_metrics(results, extras, clip=str(clip_dir), dino=str(dino_dir))
    got = {(r["task"], r["metric"]): r for r in rows}
    assert set(got) == {("remove (paper)", "clip_dir"), ("remove (paper)", "clip_sim_region"),
                        ("remove (paper)", "dino_sim_region"),
                        ("exemplar (paper)", "clip_i_region")}
    assert all(r["n"] == 1 for r in rows)
    saved = json.loads((results / "paper_metrics.json").read_text())
    assert set(saved["values"]["remove (paper)/clip_dir"]) == {"remove-a"}
    assert C.paper_metrics(results, extras, clip=None, dino=None) == []
