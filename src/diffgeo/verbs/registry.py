"""The verb registry: every verb once, with its group, options, run function and CLI defaults.

The faces (cli.py, batch.py, evaluate.py, demo.py) read verbs from here and never define one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffgeo.errors import InputError
from diffgeo.io.results import run_scope
from diffgeo.verbs.options import Options

#: Groups of ``diffgeo --help``, in display order.
GROUPS = {"analysis": "Analysis", "editing": "Editing", "runs": "Runs", "model": "Model"}


@dataclass
class Result:
    """What a verb returns: ``settings`` is its settings.json (``options`` in it re-runs it)."""

    settings: dict[str, Any] = field(default_factory=dict)

    def report(self) -> list[str]:
        """Lines the CLI prints after the run."""
        return []


@dataclass(frozen=True)
class Verb:
    name: str
    group: str
    options: type[Options]
    run: Callable[..., Result]  # run(options, backbone=None, progress=False) -> Result
    help: str
    #: The CLI's --out default (the API writes nothing without an explicit out).
    out: str | None = None
    #: Runs as a `diffgeo batch` job (writes a result folder under the job's id).
    batchable: bool = False
    #: What `diffgeo evaluate` compares in its folder: (before, after) file names, or
    #: "strengths" (apply: the reconstruction against each edit-J.png); None: not evaluated.
    compared: tuple[str, str] | str | None = None


REGISTRY: dict[str, Verb] = {}

#: The order verbs are listed in within their group; a verb missing here comes last.
ORDER = ("info", "invert", "curves", "saliency-map", "transfer", "remove", "adjust-saliency",
         "blend", "inpaint", "directions", "apply", "exemplar", "ui", "batch", "evaluate", "demo",
         "train")


def register(name: str, group: str, options: type[Options], *, out: str | None = None,
             batchable: bool = False, compared: tuple[str, str] | str | None = None
             ) -> Callable[[Callable[..., Result]], Callable[..., Result]]:
    """Decorator: ``fn`` is the run function of verb ``name``; its docstring is the help."""
    if group not in GROUPS:
        raise ValueError(f"unknown verb group {group!r}")

    def add(fn: Callable[..., Result]) -> Callable[..., Result]:
        if name in REGISTRY:
            raise ValueError(f"verb {name!r} registered twice")
        guarded = _guarded(name, fn)
        REGISTRY[name] = Verb(name, group, options, guarded,
                              " ".join((fn.__doc__ or "").split()), out, batchable, compared)
        return guarded

    return add


def _guarded(name: str, fn: Callable[..., Result]) -> Callable[..., Result]:
    """``fn`` run as one transaction: its result folders appear whole or not at all, and no
    result replaces one of its input files (whoever calls it: CLI, batch, the API)."""

    @functools.wraps(fn)
    def run_verb(opts: Options, *args: Any, **kwargs: Any) -> Result:
        if not isinstance(opts, Options):
            raise InputError(f"{name}: options must be a {fn.__name__} options object, got "
                             f"{type(opts).__name__} (use diffgeo.verbs.run({name!r}, ...))")
        with run_scope(name, opts.input_paths()):
            return fn(opts, *args, **kwargs)

    return run_verb


def get(name: str) -> Verb:
    from diffgeo import verbs as _  # noqa: F401  (the family modules fill the registry)

    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"unknown verb {name!r} (one of {', '.join(REGISTRY)})") from None


def all_verbs() -> list[Verb]:
    from diffgeo import verbs as _  # noqa: F401

    rank = {name: i for i, name in enumerate(ORDER)}
    groups = list(GROUPS)
    return sorted(REGISTRY.values(),
                  key=lambda v: (groups.index(v.group), rank.get(v.name, len(rank))))


def run(name: str, /, *, backbone: Any = None, progress: bool = False, **values: Any) -> Result:
    """Run verb ``name`` with options by name (the CLI's, in their Python spelling)."""
    verb = get(name)
    return verb.run(verb.options.build(values), backbone=backbone, progress=progress)
