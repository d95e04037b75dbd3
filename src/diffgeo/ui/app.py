"""``diffgeo ui``: the web app (Gradio). Click a pixel for its generation curve, paint a region and
edit it by curve matching (live loss, cancel), discover its h-space directions and slide along
each, or paste exemplars with painted (soft) edit maps (PIXELS); the saliency map can become the
region or an edit map.

Every button runs a verb of the registry through :class:`~diffgeo.ui.session.Session`, so a
result is the folder the CLI writes (downloadable as a zip) together with the ``diffgeo``
command that repeats it; a user error is the CLI's one-line message, shown in the page.

The image is shown enlarged by a whole factor (:attr:`Picture.factor`) rather than stretched by
CSS: Gradio maps a click to the *shown* image's pixels, so only then does a click land on one
image pixel; the painted layers come back at the shown size and are resampled to the image.
"""

# No ``from __future__ import annotations``: Gradio reads the handlers' annotations
# (``gr.SelectData``, ``gr.Progress``) as objects.
import functools
import inspect
import ipaddress
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from diffgeo.editing.curve_matching import DERIVATIVES, MODES
from diffgeo.errors import DiffgeoError, InputError
from diffgeo.ui.session import NO_IMAGE, Iteration, Picture, Run, Session

#: What the curve-matching panel offers, by label: (verb, extra options).
EDITS: dict[str, tuple[str, dict[str, Any]]] = {
    "remove the object": ("remove", {}),
    "transfer (click a reference pixel)": ("transfer", {}),
    "saliency up": ("adjust-saliency", {"increase": True}),
    "saliency down": ("adjust-saliency", {"decrease": True}),
    "blend the pasted region": ("blend", {}),
}
FITS = ("crop", "pad", "resize")
THRESHOLDS = ("linear", "quadratic", "cubic", "log1p", "sigmoid", "sigmoid-normalized")
MAX_DIRECTIONS = 8
#: The derivative choice that leaves it to the mode (CurveMatchingConfig.derivative = None).
AUTO = "auto"
EXEMPLAR_SLOTS = 3
BRUSH = "#ff3030"
#: Result images (model-sized, 32x32) fill their box with sharp pixels. Not the clickable image:
#: stretching it by CSS would break Gradio's click mapping, so it is sent enlarged instead.
CSS = """.pixelated img { width: 100% !important; height: 100% !important;
  object-fit: contain !important; image-rendering: pixelated; }"""


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise InputError("the web app needs Gradio: pip install 'diffgeo[ui]'") from None
    return gr


def _shown_errors(fn: Callable) -> Callable:
    """A user mistake becomes the CLI's one-line message in the page, not a traceback."""
    gr = _gradio()

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def streaming(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except DiffgeoError as e:
                raise gr.Error(str(e)) from None

        return streaming

    @functools.wraps(fn)
    def handler(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DiffgeoError as e:
            raise gr.Error(str(e)) from None

    return handler


def _scenes(session: Session) -> dict[str, np.ndarray]:
    from diffgeo.data import bundled_scenes

    h, w = session.backbone.image_size
    if h != w:
        return {}
    try:
        scenes = bundled_scenes(h)
    except InputError:  # a model without bundled scenes of its size: uploads only
        return {}
    return {f"{i + 1}: {s.object_name or 'object'} on {s.background_name or 'background'}":
            (s.composite * 255).round().astype(np.uint8) for i, s in enumerate(scenes[:12])}


def _needs(picture: Picture | None) -> Picture:
    if picture is None:
        raise InputError(NO_IMAGE)
    return picture


def painted_layer(mask: np.ndarray, factor: int) -> np.ndarray:
    """A mask of the image (H, W) in [0, 1] as an editor layer at the shown size: brush colour,
    opacity = the mask (what :meth:`Session.save_mask` reads back)."""
    alpha = np.clip(mask, 0, 1).repeat(factor, axis=0).repeat(factor, axis=1)
    layer = np.zeros((*alpha.shape, 4), np.uint8)
    layer[..., :3] = [int(BRUSH[i:i + 2], 16) for i in (1, 3, 5)]
    layer[..., 3] = (alpha * 255).round().astype(np.uint8)
    return layer


def saliency_on_input(run: Run) -> np.ndarray:
    """The saliency map of a ``saliency-map`` run on the input image's pixels, scaled to [0, 1]
    (its maximum is 1): the map the curves panel hands to the region and the edit maps."""
    from diffgeo.io.images import Fit
    from diffgeo.maps import upsample_to_image

    sal = run.result.saliency
    fit = Fit.from_dict(run.result.settings["fit"])
    on_model = upsample_to_image(sal, fit.out_size).numpy()
    back = fit.pull_back(on_model, fill=0.0)
    top = float(back.max())
    return back / top if top > 0 else back


def build_app(session: Session):
    """The Gradio Blocks of the app on ``session`` (not launched)."""
    gr = _gradio()
    import pandas as pd

    scenes = _scenes(session)
    editor = functools.partial(gr.ImageEditor, type="numpy", height=340, transforms=(),
                               brush=gr.Brush(colors=[BRUSH], color_mode="fixed",
                                              default_size=12),
                               layers=False, sources=(), format="png")
    result_image = functools.partial(gr.Image, format="png", interactive=False, height=260,
                                     elem_classes=["pixelated"])
    heavy = {"concurrency_id": "model", "concurrency_limit": 1}  # one model job at a time

    def canvas(picture: Picture, mask: np.ndarray | None = None) -> dict[str, Any]:
        shown = session.shown(picture)
        layers = [] if mask is None else [painted_layer(mask, picture.factor)]
        return {"background": shown, "layers": layers, "composite": shown}

    # ------------------------------------------------------------------ image in
    def show(picture: Picture):
        background = canvas(picture)
        return (picture, session.shown(picture), [], "", None, background,
                *[background] * EXEMPLAR_SLOTS)

    @_shown_errors
    def on_upload(file: str | None):
        return show(session.adopt_file(file))

    @_shown_errors
    def on_scene(name: str | None):
        if not name or name not in scenes:
            raise InputError(f"no bundled scene named {name!r}")
        return show(session.save_image(scenes[name], "scene"))

    # ------------------------------------------------------------------ curves
    def curves(picture: Picture | None, pixels: list, pixel: tuple[int, int], definition: str,
               fit: str):
        picture = _needs(picture)
        pixels = [*pixels, list(pixel)][-6:]
        run = session.run("curves", image=picture.path, pixel=[tuple(p) for p in pixels],
                          definition=definition, fit=fit)
        flucts = run.result.settings["fluctuation"]
        text = "\n".join(f"{d} {label}: fluctuation {v:.4g}" for d, per in flucts.items()
                         for label, v in per.items())
        clicked = "; ".join(f"({r}, {c})" for r, c in pixels)
        return pixels, clicked, run.file("curves.png"), text, run.command, str(run.archive)

    @_shown_errors
    def click_curve(picture: Picture | None, pixels: list, definition: str, fit: str,
                    evt: gr.SelectData, progress=gr.Progress(track_tqdm=True)):
        x, y = evt.index  # Gradio gives (x, y) on the shown copy
        return curves(picture, pixels, _needs(picture).pixel(x, y), definition, fit)

    @_shown_errors
    def typed_curve(picture: Picture | None, pixels: list, typed: str, definition: str,
                    fit: str, progress=gr.Progress(track_tqdm=True)):
        from diffgeo.io.regions import parse_point

        return curves(picture, pixels, parse_point(typed, "pixel"), definition, fit)

    @_shown_errors
    def region_curve(picture: Picture | None, painted: Any, definition: str, fit: str,
                     progress=gr.Progress(track_tqdm=True)):
        picture = _needs(picture)
        mask = session.save_mask(painted, picture.size)
        run = session.run("curves", image=picture.path, mask=mask, definition=definition,
                          fit=fit)
        flucts = run.result.settings["fluctuation"]
        text = "\n".join(f"{d} region: fluctuation {v:.4g}" for d, per in flucts.items()
                         for v in per.values())
        return run.file("curves.png"), text, run.command, str(run.archive)

    @_shown_errors
    def saliency(picture: Picture | None, fit: str, progress=gr.Progress(track_tqdm=True)):
        run = session.run("saliency-map", image=_needs(picture).path, fit=fit)
        return (run.file("saliency.png"), saliency_on_input(run), run.command,
                str(run.archive))

    @_shown_errors
    def saliency_as_region(picture: Picture | None, sal: np.ndarray | None, top: float):
        picture = _needs(picture)
        if sal is None:
            raise InputError("compute the saliency map first")
        cut = np.quantile(sal, 1 - top / 100)
        return canvas(picture, (sal >= cut).astype(np.float32))

    @_shown_errors
    def saliency_as_map(picture: Picture | None, sal: np.ndarray | None):
        picture = _needs(picture)
        if sal is None:
            raise InputError("compute the saliency map first")
        return canvas(picture, sal)

    # ------------------------------------------------------------------ curve matching
    @_shown_errors
    def edit(picture: Picture | None, painted: Any, what: str, iterations: float, mode: str,
             derivative: str, pixels: list, fit: str, progress=gr.Progress()):
        picture = _needs(picture)
        verb, extra = EDITS[what]
        budget = int(iterations)
        options: dict[str, Any] = {"image": picture.path, "iterations": budget, "mode": mode,
                                   "derivative": None if derivative == AUTO else derivative,
                                   "fit": fit, **extra,
                                   "mask": session.save_mask(painted, picture.size),
                                   "snapshot_every": max(1, budget // 6)}
        if verb == "transfer":
            if not pixels:
                raise InputError("transfer needs a reference: click a pixel on the image")
            options["reference"] = tuple(pixels[-1])
        from diffgeo.io import to_uint8

        losses: list[tuple[int, float]] = []
        strip: list[np.ndarray] = []
        shown_at = 0.0
        skip = gr.skip()
        for event in session.stream(verb, **options):
            if isinstance(event, Iteration):
                losses.append((event.iteration + 1, event.loss))
                if event.snapshot is not None:
                    strip.append(to_uint8(event.snapshot))
                progress((event.iteration + 1, budget), desc="curve matching", unit="iterations")
                if time.monotonic() - shown_at > 0.3 or event.iteration + 1 == budget:
                    shown_at = time.monotonic()
                    yield (pd.DataFrame(losses, columns=["iteration", "loss"]), list(strip),
                           skip, skip, f"iteration {event.iteration + 1}/{budget}: loss "
                           f"{event.loss:.4g}", skip, skip)
                continue
            s = event.result.settings
            text = (f"final loss {s['final_loss']:.4g} (mean of the last 10: "
                    f"{s['mean_loss_last_10']:.4g})")
            yield (pd.DataFrame(losses, columns=["iteration", "loss"]), list(strip),
                   event.file("result.png"), event.file("curves.png"), text, event.command,
                   str(event.archive))

    # ------------------------------------------------------------------ RBE
    @_shown_errors
    def discover(picture: Picture | None, painted: Any, k: float, fit: str,
                 progress=gr.Progress(track_tqdm=True)):
        picture = _needs(picture)
        run = session.run("directions", image=picture.path, k=int(k), fit=fit,
                          mask=session.save_mask(painted, picture.size))
        previews = [run.file(f"direction-{i}.png") for i in range(int(k))]
        sv = ", ".join(f"{v:.3g}" for v in run.result.settings["singular_values"])
        sliders = [gr.update(visible=i < int(k), value=0) for i in range(MAX_DIRECTIONS)]
        return (str(run.folder), previews, f"singular values: {sv}", *sliders, run.command,
                str(run.archive), str(run.archive))

    def slide(index: int) -> Callable:
        @_shown_errors
        def along(picture: Picture | None, folder: str, strength: float, fit: str,
                  progress=gr.Progress(track_tqdm=True)):
            if not folder:
                raise InputError("discover directions first")
            run = session.run("apply", image=_needs(picture).path, directions=folder,
                              index=index, strength=(float(strength),), fit=fit)
            loc = run.result.settings["locality"][0]
            text = (f"direction {index}, α={loc['strength']:+g}: change inside "
                    f"{loc['mse_inside']:.3g}, outside {loc['mse_outside']:.3g} (MSE)")
            return run.file("edit-0.png"), text, run.command, str(run.archive)

        along.__name__ = f"apply_{index}"
        return along

    # ------------------------------------------------------------------ PIXELS
    @_shown_errors
    def exemplar(picture: Picture | None, strength: float, threshold: str, prompt: str,
                 fit: str, *slots: Any, progress=gr.Progress(track_tqdm=True)):
        picture = _needs(picture)
        # the inputs come field by field (every slot's image, then every slot's map, ...)
        per_slot = [slots[i::EXEMPLAR_SLOTS] for i in range(EXEMPLAR_SLOTS)]
        chosen = [slot for slot in per_slot if slot[0]]
        if not chosen:
            raise InputError("add an exemplar image (Exemplar 1)")
        placed = [bool(slot[3]) for slot in chosen]
        if any(placed) and not all(placed):
            raise InputError("place every exemplar or none (like --place, given once per "
                             "--exemplar or not at all)")
        exemplars, maps, places = [], [], []
        for n, (file, painted, feather, use_place, row, col, scale) in enumerate(chosen, 1):
            exemplars.append(session.adopt_file(file, f"exemplar-{n}").path)
            maps.append(session.save_mask(painted, picture.size, f"map-{n}", soft=True,
                                          feather=float(feather)))
            if use_place:
                places.append((int(row), int(col), float(scale)))
        options: dict[str, Any] = {"source": picture.path, "exemplar": tuple(exemplars),
                                   "map": tuple(maps), "strength": float(strength),
                                   "threshold": threshold, "fit": fit,
                                   # painted = where the exemplar goes (--invert-maps)
                                   "invert_maps": True}
        if places:
            options["place"] = tuple(places)
        if session.backbone.conditional:
            options["prompt"] = prompt
        run = session.run("exemplar", **options)
        return (run.file("result.png"), run.file("composite.png"), run.file("masks.png"),
                run.command, str(run.archive))

    # ------------------------------------------------------------------ layout
    # delete_cache: Gradio's copies of uploads and results go when the app stops (and hourly)
    with gr.Blocks(title="diffgeo", delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## diffgeo · model `{session.backbone.name or session.model}` "
                    f"({session.backbone.image_size[0]}×{session.backbone.image_size[1]}, "
                    f"{session.steps} DDIM steps)")
        picture = gr.State(None)
        pixels = gr.State([])
        sal_state = gr.State(None)
        directions_folder = gr.State("")
        with gr.Row():
            with gr.Column(scale=1):
                view = gr.Image(label="image: click a pixel for its generation curve",
                                interactive=False, format="png", elem_id="image", height=380,
                                buttons=[], show_label=True)
                with gr.Row():
                    upload = gr.UploadButton("upload an image", file_types=["image"],
                                             type="filepath", elem_id="upload")
                    scene = gr.Dropdown(list(scenes), value=None, label="or a bundled scene",
                                        elem_id="scene")
                fit = gr.Radio(list(FITS), value="crop", label="fit to the model (--fit)")
                typed = gr.Textbox(label="or type a pixel: row, col (Enter)", elem_id="pixel")
                clicked = gr.Textbox(label="clicked pixels (row, col)", elem_id="clicked",
                                     interactive=False)
            with gr.Column(scale=2), gr.Tabs():
                with gr.Tab("Curves", id="curves"):
                    definition = gr.Dropdown(["h", "h-proj", "eps", "exact", "all"], value="h",
                                             label="definition")
                    curve_plot = result_image(label="generation curves", elem_id="curve-plot")
                    curve_text = gr.Textbox(label="fluctuation", lines=3)
                    region = editor(label="region (paint it; used by Edit and RBE too)",
                                    elem_id="region")
                    with gr.Row():
                        region_btn = gr.Button("curve of the painted region",
                                               elem_id="region-curve")
                        saliency_btn = gr.Button("whole-image saliency map", elem_id="saliency")
                    saliency_img = result_image(label="saliency map", elem_id="saliency-map")
                    with gr.Row():
                        top = gr.Slider(1, 100, value=20, step=1,
                                        label="region = the most salient % of the image")
                        to_region = gr.Button("saliency → region", elem_id="to-region")
                        to_map = gr.Button("saliency → edit map of exemplar 1",
                                           elem_id="to-map")
                with gr.Tab("Edit (curve matching)", id="edit"):
                    what = gr.Radio(list(EDITS), value="remove the object", label="edit")
                    with gr.Row():
                        iterations = gr.Slider(1, 300, value=20, step=1, label="iterations",
                                               elem_id="iterations")
                        mode = gr.Radio(list(MODES), value="fast", label="mode")
                        derivative = gr.Radio(
                            [AUTO, *DERIVATIVES], value=AUTO, label="derivative of the rates",
                            info="auto: a central difference in fast mode, the exact JVP in "
                                 "faithful mode (the paper)", elem_id="derivative")
                    with gr.Row():
                        edit_btn = gr.Button("run the edit on the painted region",
                                             elem_id="edit-run", variant="primary")
                        cancel_btn = gr.Button("cancel", elem_id="edit-cancel", variant="stop")
                    loss_plot = gr.LinePlot(x="iteration", y="loss", label="loss",
                                            elem_id="loss-plot", height=220)
                    edit_strip = gr.Gallery(label="intermediate results", columns=7,
                                            height=140, elem_id="edit-strip", format="png",
                                            object_fit="contain")
                    edit_text = gr.Textbox(label="progress", elem_id="edit-text")
                    with gr.Row():
                        edit_result = result_image(label="result", elem_id="edit-result")
                        edit_curves = result_image(label="curves before / after")
                with gr.Tab("Region directions (RBE)", id="rbe"):
                    k = gr.Slider(1, MAX_DIRECTIONS, value=3, step=1, label="directions k")
                    discover_btn = gr.Button("discover directions of the painted region",
                                             elem_id="discover", variant="primary")
                    previews = gr.Gallery(label="previews (−30, 0, +30)", columns=1,
                                          elem_id="previews", format="png",
                                          object_fit="contain")
                    sv_text = gr.Textbox(label="singular values")
                    sliders = [gr.Slider(-60, 60, value=0, step=1, label=f"direction {i}: α",
                                         visible=i < 3, elem_id=f"strength-{i}")
                               for i in range(MAX_DIRECTIONS)]
                    rbe_result = result_image(label="edited", elem_id="rbe-result")
                    rbe_text = gr.Textbox(label="inside / outside change")
                    directions_zip = gr.File(label="the directions (zip: apply --directions)",
                                             elem_id="directions-zip")
                with gr.Tab("Exemplar (PIXELS)", id="pixels"):
                    slot_inputs: list[list[Any]] = [[] for _ in range(7)]
                    maps = []
                    with gr.Tabs():
                        for n in range(1, EXEMPLAR_SLOTS + 1):
                            with gr.Tab(f"exemplar {n}"):
                                ex = gr.Image(type="filepath", label=f"exemplar {n}",
                                              height=180, sources=("upload",), format="png",
                                              elem_id=f"exemplar-{n}",
                                              elem_classes=["pixelated"])
                                m = editor(label="its edit map: paint where it goes",
                                           elem_id=f"edit-map-{n}")
                                feather = gr.Slider(0, 16, value=0, step=0.5,
                                                    label="feather (px)")
                                with gr.Row():
                                    use_place = gr.Checkbox(False, label="place it (--place)")
                                    row = gr.Number(0, precision=0, label="row")
                                    col = gr.Number(0, precision=0, label="col")
                                    scale = gr.Number(1.0, label="scale", minimum=0.01)
                                maps.append(m)
                                for group, comp in zip(slot_inputs, (ex, m, feather, use_place,
                                                                     row, col, scale),
                                                       strict=True):
                                    group.append(comp)
                    with gr.Row():
                        px_strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05,
                                                label="strength")
                        threshold = gr.Dropdown(list(THRESHOLDS), value="linear",
                                                label="threshold")
                    prompt = gr.Textbox(label="prompt (conditional models)",
                                        visible=bool(session.backbone.conditional))
                    px_btn = gr.Button("edit", elem_id="pixels-run", variant="primary")
                    with gr.Row():
                        px_result = result_image(label="result", elem_id="pixels-result")
                        px_composite = result_image(label="copy-paste composite")
                    px_masks = result_image(label="per-step masks")
        with gr.Row():
            command = gr.Textbox(label="the same run on the command line", elem_id="command",
                                 buttons=["copy"])
            archive = gr.File(label="result folder (zip)", elem_id="archive")

        shown = [picture, view, pixels, clicked, sal_state, region, *maps]
        upload.upload(on_upload, [upload], shown, api_name="image")
        scene.change(on_scene, [scene], shown, api_name="scene")
        curve_out = [pixels, clicked, curve_plot, curve_text, command, archive]
        view.select(click_curve, [picture, pixels, definition, fit], curve_out,
                    api_visibility="undocumented", **heavy)
        typed.submit(typed_curve, [picture, pixels, typed, definition, fit], curve_out,
                     api_name="curve", **heavy)
        region_btn.click(region_curve, [picture, region, definition, fit],
                         [curve_plot, curve_text, command, archive], api_name="region_curve",
                         **heavy)
        saliency_btn.click(saliency, [picture, fit], [saliency_img, sal_state, command, archive],
                           api_name="saliency", **heavy)
        to_region.click(saliency_as_region, [picture, sal_state, top], [region],
                        api_name="saliency_region")
        to_map.click(saliency_as_map, [picture, sal_state], [maps[0]], api_name="saliency_map")
        editing = edit_btn.click(edit, [picture, region, what, iterations, mode, derivative,
                                        pixels, fit],
                                 [loss_plot, edit_strip, edit_result, edit_curves, edit_text,
                                  command, archive], api_name="edit", **heavy)
        cancel_btn.click(session.cancel, None, None, cancels=[editing], api_name="cancel")
        discover_btn.click(discover, [picture, region, k, fit],
                           [directions_folder, previews, sv_text, *sliders, command, archive,
                            directions_zip], api_name="directions", **heavy)
        for i, slider in enumerate(sliders):
            slider.release(slide(i), [picture, directions_folder, slider, fit],
                           [rbe_result, rbe_text, command, archive], api_name=f"apply_{i}",
                           **heavy)
        px_btn.click(exemplar, [picture, px_strength, threshold, prompt, fit,
                                *[c for group in slot_inputs for c in group]],
                     [px_result, px_composite, px_masks, command, archive],
                     api_name="exemplar", **heavy)
    return app


def launch(model: str = "default", device: str = "cpu", host: str = "127.0.0.1",
           port: int | None = None, steps: int = 20, block: bool = True,
           session: Session | None = None):
    """Start the app; ``block=False`` returns ``(app, session, url)`` for tests (call
    ``app.close()`` and ``session.close()``)."""
    _gradio()
    if not _is_loopback(host):
        warnings.warn(f"diffgeo ui listens on {host}: anyone who can reach this machine can use "
                      "the app and its model", stacklevel=2)
    session = session or Session(model, device, steps=steps)
    app = build_app(session)
    app.queue(default_concurrency_limit=1)  # one job at a time; the rest wait in the queue
    try:
        app.launch(server_name=host, server_port=port, share=False, inbrowser=False,
                   max_file_size="20mb", allowed_paths=[str(session.root)],
                   prevent_thread_lock=not block, show_error=True, quiet=not block, css=CSS)
    except BaseException:
        session.close()
        raise
    if block:
        session.close()
        return None
    return app, session, app.local_url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
