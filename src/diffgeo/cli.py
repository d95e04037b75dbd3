"""``diffgeo`` command line: every verb of :mod:`diffgeo.verbs`, generated from its options.

    diffgeo VERB INPUT... --model M --out DIR [--device] [--dtype] [--seed] [--steps] [--fit]

Each verb writes its results into ``--out`` (PNG, ``settings.json`` with everything needed to
reproduce it, and data as NPZ/CSV) and refuses to overwrite files unless ``--force`` is given.
Nothing here defines a verb: a command is its registry entry's options turned into typer
parameters, and its body builds the options (every check runs there), runs and prints.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import shlex
import sys
import typing
from pathlib import Path
from typing import Any

import typer

from diffgeo.errors import DiffgeoError
from diffgeo.verbs import GROUPS, Verb, all_verbs
from diffgeo.verbs.options import RESERVED, Choice, hint_shape, meta_of

app = typer.Typer(
    name="diffgeo",
    help="The geometry of pretrained diffusion models as tools: generation curves, "
    "region-based h-space editing and progressive exemplar editing.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Shared options come after a verb's own in its --help.
_SHARED = ("model", "prompt", "fit", "out", "device", "dtype", "seed", "force", "max_memory")


def _fail(message: str, code: int = 2) -> typing.NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _cli_text(value: Any) -> Any:
    """A parsed default (a tuple of numbers, a point) as the text its flag takes."""
    if isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value):
        return ",".join(f"{v:g}" for v in value)
    return value


def _parameter(verb: Verb, f: dataclasses.Field, hint: Any) -> inspect.Parameter:
    meta = meta_of(f)
    tp, optional, repeat = hint_shape(hint)
    textual = meta.parse is not None or (isinstance(tp, type) and issubclass(tp, Choice))
    cli_type: Any = str if textual else tp
    default = f.default
    if repeat and not meta.listed:
        cli_type, default = list[cli_type], list(default)  # a repeatable flag
    elif meta.parse is not None:
        cli_type, default = str, _cli_text(default)  # one value, comma-separated
    if isinstance(default, Choice):
        default = default.value
    if f.name == "out" and verb.out is not None:
        default = Path(verb.out)
    if optional and default is None:
        cli_type = cli_type | None
    required = default is dataclasses.MISSING
    if meta.argument:
        info = typer.Argument(... if required else default, help=meta.help)
    else:
        info = typer.Option(... if required else default, *meta.flags, help=meta.help)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info,
                             annotation=cli_type)


def _in_cli_terms(verb: Verb, message: str) -> str:
    """A message that starts with an option's Python name (a method config's check, shared
    with the API) names its flag instead: ``lr must be > 0`` becomes ``--lr must be > 0``."""
    m = re.match(r"([a-z][a-z0-9_]*)(?= (must|and) )", message)
    if m is not None:
        fields = {f.name: meta_of(f) for f in dataclasses.fields(verb.options)}
        meta = fields.get(m.group(1))
        if meta is not None and meta.cli and not meta.argument:
            return meta.flag(m.group(1)) + message[m.end():]
    return message


def _command(verb: Verb):
    hints = typing.get_type_hints(verb.options)
    fields = [f for f in dataclasses.fields(verb.options) if meta_of(f).cli]
    rank = {n: i for i, n in enumerate(_SHARED)}
    fields.sort(key=lambda f: (not meta_of(f).argument, rank.get(f.name, -1)))
    params = [_parameter(verb, f, hints[f.name]) for f in fields]

    def command(**values: Any) -> None:
        try:
            result = verb.run(verb.options(**values), progress=True)
        except DiffgeoError as e:
            _fail(_in_cli_terms(verb, str(e)))
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        for line in result.report():
            typer.echo(line)
        if verb.batchable and values.get("out") is not None:
            typer.echo(f"wrote {values['out']}/")
        if getattr(result, "exit_code", 0):
            raise typer.Exit(result.exit_code)

    command.__name__ = verb.name.replace("-", "_")
    command.__doc__ = verb.help
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def command_line(verb: Verb, opts: Any) -> str:
    """The ``diffgeo`` command that runs ``verb`` with the options ``opts`` (those that differ
    from their defaults, without --out/--force): what a face other than the CLI (the web app)
    shows for a result."""
    words = ["diffgeo", verb.name]
    flags: list[str] = []
    hints = typing.get_type_hints(verb.options)
    for f in dataclasses.fields(verb.options):
        meta = meta_of(f)
        value = getattr(opts, f.name)
        if not meta.cli or f.name in RESERVED or (f.default is not dataclasses.MISSING
                                                  and value == f.default):
            continue  # --out/--force: where to write is the user's to add
        if meta.argument:
            words.append(str(value))
            continue
        if isinstance(value, bool):
            on, _, off = (meta.flags[0] if meta.flags else meta.flag(f.name)).partition("/")
            flags.append(on if value else (off or "--no-" + on[2:]))
            continue
        # a repeatable flag exactly where _parameter made one
        repeated = hint_shape(hints[f.name])[2] and not meta.listed
        for item in (value if repeated else (value,)):
            flags += [meta.flag(f.name),
                      str(_cli_text(item.value if isinstance(item, Choice) else item))]
    return shlex.join(words + flags)


for _verb in all_verbs():
    app.command(_verb.name, rich_help_panel=GROUPS[_verb.group])(_command(_verb))


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
