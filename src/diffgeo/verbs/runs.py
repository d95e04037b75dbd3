"""``batch``, ``evaluate``, ``demo``: verbs that run other verbs (runs). Their machinery lives
in diffgeo.batch, diffgeo.evaluate and diffgeo.demo; these are their declarations."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from diffgeo.verbs.options import (
    DEVICE_HELP,
    FORCE_HELP,
    MODEL_HELP,
    SEED_HELP,
    ModelOptions,
    Options,
    at_least,
    in_range,
    option,
)
from diffgeo.verbs.registry import Result, register

if TYPE_CHECKING:
    from diffgeo.backbones.base import Backbone


@dataclass(frozen=True, kw_only=True)
class BatchOptions(Options):
    jobs: Path = option(help="JSON-lines jobs file: one object per line with \"verb\" (any "
                        "verb that writes a result folder, by its CLI name), optional \"id\", "
                        "and the verb's options by their CLI names (e.g. steps, pixel); or "
                        "a settings.json of an earlier run.", argument=True)
    out: Path = option(Path("out/batch"), "Output folder: one sub-folder per job, records/ "
                       "with one record per job.")
    device: str | None = option(None, "Device for jobs that name none (default: the process's "
                                "accelerate device, else cpu).")


@dataclass
class BatchResult(Result):
    line: str = ""
    exit_code: int = 0

    def report(self) -> list[str]:
        return [self.line]


def record_line(rec: dict[str, Any], prefixed: bool) -> str:
    msg = f"{rec['id']}: {rec['status']} ({rec['seconds']:.1f} s)"
    msg = f"[{rec['process_index']}] {msg}" if prefixed else msg
    return msg + (f" - {rec['error']}" if rec["error"] else "")


@register("batch", "runs", BatchOptions)
def batch(opts: BatchOptions, backbone: Backbone | None = None,
          progress: bool = False) -> BatchResult:
    """Run many jobs, skipping those already complete (resumable); under `accelerate launch`
    the jobs are split across the processes. A failing job is recorded and the rest go on."""
    from diffgeo.batch import current_shard, run_batch

    shard = current_shard()
    many = shard.num_processes > 1

    def show(rec: dict[str, Any]) -> None:
        if progress:
            # One write per line: under a launcher the processes share stdout, often unbuffered
            # (print would write the text and the newline separately and lines would interleave).
            sys.stdout.write(record_line(rec, many) + "\n")
            sys.stdout.flush()

    summary = run_batch(opts.jobs, opts.out, shard=shard, device=opts.device, on_record=show)
    prefix = f"[{shard.process_index}/{shard.num_processes}] " if many else ""
    # Under a launcher one process exiting non-zero gets the others killed: failed jobs are in
    # the records, so only a lone process reports them through its exit status.
    code = 1 if summary.count("failed") and not many else 0
    return BatchResult({"verb": "batch"}, f"{prefix}{summary.line()}; records in "
                       f"{opts.out}/records/", code)


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(Options):
    results: Path = option(help="A `diffgeo batch` output folder.", argument=True,
                           protect=False)  # the report is written into it
    metric: tuple[str, ...] = option((), "psnr, ssim or mse (repeatable; default: all three).")
    clip: str | None = option(None, "Also CLIP_sim (and CLIP-I for exemplar jobs) with this "
                              "CLIP model (hub id or folder).")
    dino: str | None = option(None, "Also DINO_sim per pair and fd_dino per task (Fréchet "
                              "distance of DINO features, inputs vs results) with this DINO "
                              "model (hub id or folder).")
    lpips: bool = option(True, "LPIPS per pair when the lpips package and its AlexNet weights "
                         "are already here (never downloaded).")
    fid: bool = option(True, "FID per task when pytorch_fid and its Inception weights are "
                       "already here (never downloaded).")
    device: str = option("cpu", DEVICE_HELP)
    force: bool = option(False, "Overwrite evaluation.csv / evaluation.json.")

    def validate(self) -> None:
        from diffgeo.errors import InputError
        from diffgeo.evaluate import METRICS

        bad = [m for m in self.metric if m not in METRICS]
        if bad:
            raise InputError(f"unknown metric(s) {', '.join(bad)} (choose among "
                             f"{', '.join(METRICS)}; LPIPS and FID are added when available, "
                             "fd_dino with a DINO model)")


@dataclass
class EvaluateResult(Result):
    table: Any = None

    def report(self) -> list[str]:
        from diffgeo.evaluate import format_table

        return [format_table(self.table),
                f"wrote {self.settings['results']}/evaluation.csv and evaluation.json"]


@register("evaluate", "runs", EvaluateOptions)
def evaluate(opts: EvaluateOptions, backbone: Backbone | None = None,
             progress: bool = False) -> EvaluateResult:
    """Metrics over a batch's finished jobs (invert, exemplar, apply, ...): a table per task of
    mean ± std and N, also written as RESULTS/evaluation.csv and evaluation.json. Set metrics
    (fd_dino, fid) are one value per task over its N pairs, with std nan. A metric that cannot
    run here gets a `note:` line saying why."""
    from diffgeo.evaluate import METRICS, evaluate_results

    table = evaluate_results(opts.results, opts.metric or METRICS, clip=opts.clip,
                             dino=opts.dino, device=opts.device, force=opts.force,
                             lpips=opts.lpips, fid=opts.fid)
    return EvaluateResult({"verb": "evaluate", "results": str(opts.results)}, table)


@dataclass(frozen=True, kw_only=True)
class DemoOptions(Options):
    out: Path = option(Path("diffgeo-demo"), "Output folder for index.html.")
    model: str = option("default", MODEL_HELP)
    quick: bool = option(False, "A reduced run (fewer scenes and steps), for CI.")
    device: str = option("cpu", DEVICE_HELP)
    seed: int = option(0, SEED_HELP)
    force: bool = option(False, FORCE_HELP)


@dataclass
class DemoResult(Result):
    page: Path | None = None

    def report(self) -> list[str]:
        return [f"open {self.page}"]


@register("demo", "runs", DemoOptions)
def demo(opts: DemoOptions, backbone: Backbone | None = None,
         progress: bool = False) -> DemoResult:
    """Run every diffgeo feature on the default model and bundled scenes; writes
    DIR/index.html, a page of images and plots."""
    from diffgeo.demo import run_demo

    page = run_demo(out=opts.out, model=backbone or opts.model, quick=opts.quick,
                    device=opts.device, seed=opts.seed, force=opts.force)
    return DemoResult({"verb": "demo"}, page)


@dataclass(frozen=True, kw_only=True)
class UIOptions(ModelOptions):
    DIFFERENTIATES = True  # curves, curve matching and RBE run on the app's one model

    host: str = option("127.0.0.1", "Address to listen on (anything but a loopback address "
                       "makes the app reachable from other machines: a warning says so).")
    port: int | None = option(None, "Port (default: Gradio's, 7860 or the next free one).",
                              check=in_range(0, 65535))
    steps: int = option(20, "DDIM steps of every action.", check=at_least(1))


@register("ui", "runs", UIOptions)
def ui(opts: UIOptions, backbone: Backbone | None = None, progress: bool = False) -> Result:
    """Start the web app in the browser: click a pixel for its generation curve, paint a region
    to edit it (curve matching) or find its h-space directions, paste exemplars (needs the ui
    extra: pip install 'diffgeo[ui]')."""
    from diffgeo.ui.app import launch
    from diffgeo.ui.session import Session

    session = Session(opts.model, backbone=backbone, steps=opts.steps, **opts.load_kwargs())
    launch(host=opts.host, port=opts.port, session=session)
    return Result({"verb": "ui", "options": opts.to_dict()})
