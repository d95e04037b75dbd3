"""Error types raised for bad user input.

Every check on user input raises one of these, with a message that names the argument, what was
expected and what was given, so that the CLI can print it without a traceback.
"""

from __future__ import annotations


class DiffgeoError(Exception):
    """Base class of every error diffgeo raises on purpose."""


class InputError(DiffgeoError, ValueError):
    """An argument, file or option given by the user is unusable."""


class ModelNotFoundError(DiffgeoError, FileNotFoundError):
    """A model id or folder could not be resolved (offline, typo, missing weights)."""


class OutputExistsError(DiffgeoError, FileExistsError):
    """Writing would overwrite something that already exists and ``force`` was not given."""
