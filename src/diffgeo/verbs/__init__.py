"""The verb registry: each verb once — typed options, a run function, a typed result that
writes itself into a result folder. cli.py, batch.py, evaluate.py and demo.py are built on it.

    from diffgeo import verbs
    res = verbs.run("invert", image="cat.png", t=500, steps=10, fit="crop", out="out/cat")
    res.settings["psnr"]

Modules, by group: analysis (:mod:`.invert`, :mod:`.curves`), editing (:mod:`.curve_edit`,
:mod:`.rbe`, :mod:`.exemplar`, :mod:`.inpaint`), runs (:mod:`.runs`), model (:mod:`.model`);
:mod:`.options` declares options, :mod:`.common` what verbs over image files share.
"""

from diffgeo.verbs import curve_edit, curves, exemplar, inpaint, invert, model, rbe, runs
from diffgeo.verbs.registry import GROUPS, REGISTRY, Result, Verb, all_verbs, get, run

__all__ = ["GROUPS", "REGISTRY", "Result", "Verb", "all_verbs", "get", "run", "curve_edit",
           "curves", "exemplar", "inpaint", "invert", "model", "rbe", "runs"]
