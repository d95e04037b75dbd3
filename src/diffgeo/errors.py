"""Error types raised for bad user input.

Every check on user input raises one of these, with a message that names the argument, what was
expected and what was given, so that the CLI can print it without a traceback.
"""

from __future__ import annotations

import numbers
from typing import Any


class DiffgeoError(Exception):
    """Base class of every error diffgeo raises on purpose."""


class InputError(DiffgeoError, ValueError):
    """An argument, file or option given by the user is unusable."""


class ModelNotFoundError(DiffgeoError, FileNotFoundError):
    """A model id or folder could not be resolved (offline, typo, missing weights)."""


class OutputExistsError(DiffgeoError, FileExistsError):
    """Writing would overwrite something that already exists and ``force`` was not given."""


class OutputError(DiffgeoError, OSError):
    """A result could not be written (unwritable folder, full disk): nothing partial is left."""


class NonFiniteError(DiffgeoError, ArithmeticError):
    """A computation produced NaN or infinity; its result is refused rather than written."""


class Cancelled(DiffgeoError):
    """The person who started a run stopped it (the web app's cancel button); nothing of the
    run is kept."""


def check_int(value: Any, name: str, low: int) -> int:
    """``value`` as an int when it is an integer >= ``low``; an :class:`InputError` naming
    ``name`` otherwise. numpy integers count (settings read back from JSON or the CLI); bools do
    not (``k=True`` is a mistake, not 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer >= {low}, got {value!r}")
    if value < low:
        raise InputError(f"{name} must be >= {low}, got {value}")
    return int(value)


def check_finite(value: Any, what: str, allow_inf: bool = False) -> None:
    """A :class:`NonFiniteError` naming ``what`` when the tensor or array ``value`` holds a NaN
    (or an infinity, unless ``allow_inf``: a PSNR of identical images is +inf, and right);
    integer and boolean data always pass."""
    if hasattr(value, "detach"):  # a torch tensor (no torch import for the error types)
        v = value.detach()
        bad = v.is_floating_point() and bool((v.isnan() if allow_inf else ~v.isfinite()).any())
    else:
        import numpy as np

        arr = np.asarray(value)
        bad = bool(np.issubdtype(arr.dtype, np.inexact)
                   and (np.isnan(arr) if allow_inf else ~np.isfinite(arr)).any())
    if bad:
        raise NonFiniteError(f"{what} contains {'NaN' if allow_inf else 'NaN or infinite'} "
                             "values")
