"""PIXELS (progressive exemplar editing) vs diffusers' own img2img pipeline: time, U-Net calls,
peak memory, with the same model, scheduler grid and steps.

    python benchmarks/pixels_overhead.py [--reps 5] [--steps 50] [--strength 0.8] [--device cpu]

The model is a randomly initialised Stable-Diffusion-shaped U-Net (compute does not depend on
weight values) with a tiny VAE and text encoder, built once into a temporary folder and loaded by
both sides. Each measurement runs in its own subprocess (so peak RSS on CPU, or peak CUDA memory
on a GPU, belongs to one method), alternating methods so the time ratio comes from one run under
the same load. Both sides do the same work: encode the image(s), denoise with deterministic DDIM,
decode; img2img gets an empty prompt and guidance 1 (no classifier-free guidance), as PIXELS.
Time is also reported per U-Net call, because the two pick their first timestep differently
(img2img: int(steps·strength) steps; PIXELS: the grid point nearest strength·T).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from random_sd import DDIM_CONFIG, narrow_vae, write_clip_tokenizer


def build(folder: Path) -> None:
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=32, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16, layers_per_block=2,
    ).save_pretrained(folder / "unet")
    narrow_vae(sample_size=256).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1)).save_pretrained(folder / "text_encoder")
    write_clip_tokenizer(folder / "tokenizer")
    DDIMScheduler(**DDIM_CONFIG).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers",
                                                                     "DDIMScheduler"]}))


def img2img_pipeline(bb, scheduler):
    """diffusers' img2img pipeline (SD or SDXL, as the backbone is) over the backbone's modules."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

    if bb.text_encoder_2 is not None:
        pipe = StableDiffusionXLImg2ImgPipeline(
            vae=bb.vae, text_encoder=bb.text_encoder, text_encoder_2=bb.text_encoder_2,
            tokenizer=bb.tokenizer, tokenizer_2=bb.tokenizer_2, unet=bb.unet,
            scheduler=scheduler, requires_aesthetics_score=False)
    else:
        pipe = StableDiffusionImg2ImgPipeline(
            vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edit(method: str, bb, scheduler, steps: int, strength: float) -> Callable[[], None]:
    """One edit by ``method`` ("img2img" or "pixels") on the backbone's modules, as a callable:
    a random image (and exemplar) at the model's size, the exemplar pasted outside a centred
    square; img2img denoises with ``scheduler`` (a DDIM one), PIXELS on the same grid."""
    g = torch.Generator().manual_seed(0)
    H, W = bb.image_size
    image = (torch.rand(1, 3, H, W, generator=g) * 2 - 1).to(bb.device)
    exemplar = (torch.rand(1, 3, H, W, generator=g) * 2 - 1).to(bb.device)
    emap = torch.ones(1, 1, H, W)
    emap[..., H // 4:3 * H // 4, W // 4:3 * W // 4] = 0
    if method == "img2img":
        pipe = img2img_pipeline(bb, scheduler)

        def work():
            # diffusers takes tensors in [0, 1] (and normalises them to [-1, 1] itself)
            pipe(prompt="", image=(image + 1) / 2, strength=strength, num_inference_steps=steps,
                 guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                 output_type="pt")
        return work
    from diffgeo.editing import PixelsConfig, pixels_edit

    def work():
        with torch.no_grad():
            src, ex = bb.to_state(image), bb.to_state(exemplar)
            res = pixels_edit(bb, src, [ex], [emap], PixelsConfig(strength=strength),
                              generator=torch.Generator().manual_seed(0), grid=steps)
            bb.to_image(res.state)
    return work


def time_edit(work: Callable[[], None], bb, device: str) -> dict:
    """Seconds, U-Net calls and peak memory of one call of ``work`` after a warm-up call. Peak
    memory is CUDA's allocator peak of this call on a GPU, the process's peak RSS on a CPU."""
    calls = [0]
    hook = bb.unet.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        work()  # warm-up (first-call overheads belong to neither method)
        calls[0] = 0
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        work()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    finally:
        hook.remove()
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": seconds, "unet_calls": calls[0], "peak_bytes": peak}


def run_one(method: str, folder: Path, steps: int, strength: float, device: str) -> dict:
    """One timed edit in this process; returns seconds, U-Net calls and peak memory."""
    from diffusers import DDIMScheduler

    from diffgeo.backbones import load_backbone

    bb = load_backbone(folder, device=device)
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    return time_edit(edit(method, bb, scheduler, steps, strength), bb, device)


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Medians per method and PIXELS' overheads over img2img (time, per U-Net call, memory)."""
    summary: dict = {}
    for method, rs in runs.items():
        secs = statistics.median(r["seconds"] for r in rs)
        calls = rs[0]["unet_calls"]
        summary[method] = {"seconds": secs, "unet_calls": calls, "seconds_per_call": secs / calls,
                           "peak_mb": statistics.median(r["peak_bytes"] for r in rs) / 2**20}
    a, b = summary["img2img"], summary["pixels"]
    summary["time_overhead_percent"] = 100 * (b["seconds"] / a["seconds"] - 1)
    summary["per_call_overhead_percent"] = 100 * (b["seconds_per_call"] / a["seconds_per_call"]
                                                  - 1)
    summary["peak_memory_delta_mb"] = b["peak_mb"] - a["peak_mb"]
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--strength", type=float, default=0.8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        res = run_one(args.child[0], Path(args.child[1]), args.steps, args.strength, args.device)
        print(json.dumps(res))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sd-random"
        build(folder)
        runs: dict[str, list[dict]] = {"img2img": [], "pixels": []}
        for _ in range(args.reps):
            for method in ("img2img", "pixels"):
                out = subprocess.run(
                    [sys.executable, __file__, "--child", method, str(folder), "--steps",
                     str(args.steps), "--strength", str(args.strength), "--device",
                     args.device, "--threads", str(args.threads)],
                    capture_output=True, text=True, check=True)
                runs[method].append(json.loads(out.stdout.strip().splitlines()[-1]))
    summary = summarise(runs)
    summary["setup"] = {"device": args.device, "threads": args.threads, "steps": args.steps,
                        "strength": args.strength, "reps": args.reps,
                        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    for method in ("img2img", "pixels"):
        r = summary[method]
        print(f"{method:8s} {r['seconds']:8.3f} s  {r['unet_calls']:3d} U-Net calls  "
              f"{r['seconds_per_call'] * 1e3:8.2f} ms/call  peak {r['peak_mb']:8.1f} MB")
    print(f"PIXELS overhead: {summary['time_overhead_percent']:+.1f}% time, "
          f"{summary['per_call_overhead_percent']:+.1f}% per U-Net call, "
          f"{summary['peak_memory_delta_mb']:+.1f} MB peak memory")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
