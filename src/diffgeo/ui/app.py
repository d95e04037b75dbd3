"""``diffgeo ui``: the web app (Gradio). Click a pixel for its generation curve, paint a region and
edit it by curve matching, discover its h-space directions and slide along one, or paste
exemplars with painted edit maps (PIXELS).

Every button runs a verb of the registry through :class:`~diffgeo.ui.session.Session`, so a
result is the folder the CLI writes (downloadable as a zip) together with the ``diffgeo``
command that repeats it; a user error is the CLI's one-line message, shown in the page.
"""

import functools
import ipaddress
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from diffgeo.errors import DiffgeoError, InputError
from diffgeo.ui.session import Session

#: What the curve-matching panel offers, by label: (verb, extra options).
EDITS: dict[str, tuple[str, dict[str, Any]]] = {
    "remove the object": ("remove", {}),
    "transfer (click a reference pixel)": ("transfer", {}),
    "saliency up": ("adjust-saliency", {"increase": True}),
    "saliency down": ("adjust-saliency", {"decrease": True}),
    "blend the pasted region": ("blend", {}),
}
FITS = ("crop", "pad", "resize")
#: Model-sized images (32x32) are drawn enlarged with sharp pixels, so a click lands on one.
CSS = """
#image img, #curve-plot img, #edit-result img, #rbe-result img, #pixels-result img,
#saliency-map img { object-fit: contain !important; width: 100% !important;
  height: 100% !important; image-rendering: pixelated; }
"""


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise InputError("the web app needs Gradio: pip install 'diffgeo[ui]'") from None
    return gr


def _shown_errors(fn: Callable) -> Callable:
    """A user mistake becomes the CLI's one-line message in the page, not a traceback."""
    gr = _gradio()

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


def _pixel(evt: Any) -> tuple[int, int]:
    x, y = evt.index  # Gradio gives (x, y) in the image's own pixels
    return int(y), int(x)


def build_app(session: Session):
    """The Gradio Blocks of the app on ``session`` (not launched)."""
    gr = _gradio()
    scenes = _scenes(session)
    editor = functools.partial(gr.ImageEditor, type="numpy", height=320, transforms=(),
                               brush=gr.Brush(colors=["#ff3030"], color_mode="fixed",
                                              default_size=3),
                               layers=False, sources=())

    def size_of(path: str) -> tuple[int, int]:
        from diffgeo.io.images import header_size

        hw = header_size(path)
        if hw is None:
            raise InputError("no image: upload one or pick a bundled scene")
        return hw

    def needs(path: str | None) -> str:
        if not path:
            raise InputError("no image: upload one or pick a bundled scene")
        return path

    # ------------------------------------------------------------------ handlers
    @_shown_errors
    def take_image(image: np.ndarray | None):
        path = str(session.save_image(image))
        background = {"background": image, "layers": [], "composite": image}
        return path, [], "", background, background

    def pick_scene(name: str):
        return scenes[name] if name in scenes else None

    @_shown_errors
    def click_curve(path: str, pixels: list, definition: str, fit: str,
                    evt: gr.SelectData, progress=gr.Progress(track_tqdm=True)):
        pixels = [*pixels, list(_pixel(evt))][-6:]
        run = session.run("curves", image=needs(path), pixel=[tuple(p) for p in pixels],
                          definition=definition, fit=fit)
        flucts = run.result.settings["fluctuation"]
        text = "\n".join(f"{d} {label}: fluctuation {v:.4g}" for d, per in flucts.items()
                         for label, v in per.items())
        clicked = "; ".join(f"({r}, {c})" for r, c in pixels)
        return pixels, clicked, run.file("curves.png"), text, run.command, str(run.archive)

    @_shown_errors
    def region_curve(path: str, painted: Any, definition: str, fit: str,
                     progress=gr.Progress(track_tqdm=True)):
        mask = session.save_mask(painted, size_of(needs(path)))
        run = session.run("curves", image=path, mask=mask, definition=definition, fit=fit)
        flucts = run.result.settings["fluctuation"]
        text = "\n".join(f"{d} region: fluctuation {v:.4g}" for d, per in flucts.items()
                         for v in per.values())
        return run.file("curves.png"), text, run.command, str(run.archive)

    @_shown_errors
    def saliency(path: str, fit: str, progress=gr.Progress(track_tqdm=True)):
        run = session.run("saliency-map", image=needs(path), fit=fit)
        return run.file("saliency.png"), run.command, str(run.archive)

    @_shown_errors
    def edit(path: str, painted: Any, what: str, iterations: float, mode: str, pixels: list,
             fit: str, progress=gr.Progress(track_tqdm=True)):
        verb, extra = EDITS[what]
        options: dict[str, Any] = {"image": needs(path), "iterations": int(iterations),
                                   "mode": mode, "fit": fit, **extra,
                                   "mask": session.save_mask(painted, size_of(path))}
        if verb == "transfer":
            if not pixels:
                raise InputError("transfer needs a reference: click a pixel on the image")
            options["reference"] = tuple(pixels[-1])
        run = session.run(verb, **options)
        s = run.result.settings
        text = f"final loss {s['final_loss']:.4g} (mean of the last 10: " \
               f"{s['mean_loss_last_10']:.4g})"
        return (run.file("result.png"), run.file("strip.png"), run.file("curves.png"), text,
                run.command, str(run.archive))

    @_shown_errors
    def discover(path: str, painted: Any, k: float, fit: str,
                 progress=gr.Progress(track_tqdm=True)):
        run = session.run("directions", image=needs(path), k=int(k), fit=fit,
                          mask=session.save_mask(painted, size_of(path)))
        previews = [run.file(f"direction-{i}.png") for i in range(int(k))]
        sv = ", ".join(f"{v:.3g}" for v in run.result.settings["singular_values"])
        choices = [str(i) for i in range(int(k))]
        return (str(run.folder), previews, f"singular values: {sv}",
                gr.update(choices=choices, value="0"), run.command, str(run.archive))

    @_shown_errors
    def slide(path: str, folder: str, index: str, strength: float, fit: str,
              progress=gr.Progress(track_tqdm=True)):
        if not folder:
            raise InputError("discover directions first")
        run = session.run("apply", image=needs(path), directions=folder, index=int(index),
                          strength=(float(strength),), fit=fit)
        loc = run.result.settings["locality"][0]
        text = (f"α={loc['strength']:+g}: change inside {loc['mse_inside']:.3g}, outside "
                f"{loc['mse_outside']:.3g} (MSE)")
        return run.file("edit-0.png"), text, run.command, str(run.archive)

    @_shown_errors
    def exemplar(path: str, exemplar_image: np.ndarray | None, painted: Any, strength: float,
                 threshold: str, prompt: str, fit: str, progress=gr.Progress(track_tqdm=True)):
        source = needs(path)
        ex = session.save_image(exemplar_image, "exemplar")
        edit_map = session.save_mask(painted, size_of(source), "map")
        run = session.run("exemplar", source=source, exemplar=(ex,), map=(edit_map,),
                          strength=float(strength), threshold=threshold, prompt=prompt,
                          fit=fit)
        return (run.file("result.png"), run.file("composite.png"), run.file("masks.png"),
                run.command, str(run.archive))

    # ------------------------------------------------------------------ layout
    # delete_cache: Gradio's copies of uploads and results go when the app stops (and hourly)
    with gr.Blocks(title="diffgeo", delete_cache=(3600, 3600)) as app:
        gr.Markdown(f"## diffgeo · model `{session.backbone.name or session.model}` "
                    f"({session.backbone.image_size[0]}×{session.backbone.image_size[1]}, "
                    f"{session.steps} DDIM steps)")
        path = gr.State("")
        pixels = gr.State([])
        directions_folder = gr.State("")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="numpy", label="image (click a pixel)", height=320,
                                 elem_id="image", sources=("upload",))
                scene = gr.Dropdown(list(scenes), label="or a bundled scene", elem_id="scene")
                fit = gr.Radio(list(FITS), value="crop", label="fit to the model (--fit)")
                clicked = gr.Textbox(label="clicked pixels (row, col)", elem_id="clicked")
            with gr.Column(scale=2), gr.Tabs():
                with gr.Tab("Curves", id="curves"):
                    definition = gr.Dropdown(["h", "h-proj", "eps", "exact", "all"], value="h",
                                             label="definition")
                    curve_plot = gr.Image(label="generation curves", elem_id="curve-plot")
                    curve_text = gr.Textbox(label="fluctuation", lines=3)
                    region = editor(label="region (paint it)", elem_id="region")
                    with gr.Row():
                        region_btn = gr.Button("curve of the painted region",
                                               elem_id="region-curve")
                        saliency_btn = gr.Button("whole-image saliency map", elem_id="saliency")
                    saliency_img = gr.Image(label="saliency map", elem_id="saliency-map")
                with gr.Tab("Edit (curve matching)", id="edit"):
                    what = gr.Radio(list(EDITS), value="remove the object", label="edit")
                    with gr.Row():
                        iterations = gr.Slider(1, 300, value=20, step=1, label="iterations")
                        mode = gr.Radio(["fast", "faithful"], value="fast", label="mode")
                    edit_btn = gr.Button("run the edit (uses the region painted under Curves)",
                                         elem_id="edit-run", variant="primary")
                    with gr.Row():
                        edit_result = gr.Image(label="result", elem_id="edit-result")
                        edit_curves = gr.Image(label="curves before / after")
                    edit_strip = gr.Image(label="intermediate results")
                    edit_text = gr.Textbox(label="loss")
                with gr.Tab("Region directions (RBE)", id="rbe"):
                    k = gr.Slider(1, 8, value=3, step=1, label="directions k")
                    discover_btn = gr.Button("discover directions of the painted region",
                                             elem_id="discover", variant="primary")
                    previews = gr.Gallery(label="previews (−30, 0, +30)", columns=1)
                    sv_text = gr.Textbox(label="singular values")
                    with gr.Row():
                        index = gr.Dropdown(["0"], value="0", label="direction")
                        strength = gr.Slider(-60, 60, value=0, step=1, label="strength α",
                                             elem_id="strength")
                    rbe_result = gr.Image(label="edited", elem_id="rbe-result")
                    rbe_text = gr.Textbox(label="inside / outside change")
                with gr.Tab("Exemplar (PIXELS)", id="pixels"):
                    exemplar_img = gr.Image(type="numpy", label="exemplar", height=200,
                                            elem_id="exemplar", sources=("upload",))
                    edit_map = editor(label="edit map on the source (paint where)",
                                      elem_id="edit-map")
                    with gr.Row():
                        px_strength = gr.Slider(0.05, 1.0, value=0.8, step=0.05,
                                                label="strength")
                        threshold = gr.Dropdown(["linear", "quadratic", "cubic", "log1p",
                                                 "sigmoid"], value="linear", label="threshold")
                    prompt = gr.Textbox(label="prompt (conditional models)",
                                        visible=bool(session.backbone.conditional))
                    px_btn = gr.Button("edit", elem_id="pixels-run", variant="primary")
                    with gr.Row():
                        px_result = gr.Image(label="result", elem_id="pixels-result")
                        px_composite = gr.Image(label="copy-paste composite")
                    px_masks = gr.Image(label="per-step masks")
        with gr.Row():
            command = gr.Textbox(label="the same run on the command line", elem_id="command",
                                 buttons=["copy"])
            archive = gr.File(label="result folder (zip)", elem_id="archive")

        image.upload(take_image, [image], [path, pixels, clicked, region, edit_map],
                     api_name="image")
        scene.change(pick_scene, [scene], [image], api_name="scene").then(
            take_image, [image], [path, pixels, clicked, region, edit_map], api_name=False)
        image.select(click_curve, [path, pixels, definition, fit],
                     [pixels, clicked, curve_plot, curve_text, command, archive],
                     api_name="curve")
        region_btn.click(region_curve, [path, region, definition, fit],
                         [curve_plot, curve_text, command, archive], api_name="region_curve")
        saliency_btn.click(saliency, [path, fit], [saliency_img, command, archive],
                           api_name="saliency")
        edit_btn.click(edit, [path, region, what, iterations, mode, pixels, fit],
                       [edit_result, edit_strip, edit_curves, edit_text, command, archive],
                       api_name="edit")
        discover_btn.click(discover, [path, region, k, fit],
                           [directions_folder, previews, sv_text, index, command, archive],
                           api_name="directions")
        strength.release(slide, [path, directions_folder, index, strength, fit],
                         [rbe_result, rbe_text, command, archive], api_name="apply")
        px_btn.click(exemplar, [path, exemplar_img, edit_map, px_strength, threshold, prompt,
                                fit], [px_result, px_composite, px_masks, command, archive],
                     api_name="exemplar")
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
