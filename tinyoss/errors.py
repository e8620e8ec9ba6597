"""Every error tinyoss raises on bad input derives from TinyossError.

The CLI catches TinyossError and prints its one-line message (no traceback), so each message names
the file, tensor, field or argument that is wrong.

TinyossError is a ValueError, so `except ValueError` catches bad input as Python users expect; a
wrong *type* passed to the API (`tinyoss.load(123)`) raises TinyossTypeError, which is also a
TypeError.
"""

from __future__ import annotations


class TinyossError(ValueError):
    """Base class of all errors tinyoss raises for bad input."""


class TinyossTypeError(TinyossError, TypeError):
    """An argument of the wrong type (both a TinyossError and a TypeError)."""


class ConfigError(TinyossError):
    """A config.json is missing, not JSON, or has a missing/invalid key."""


class CheckpointError(TinyossError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the config."""


class NonFiniteError(TinyossError):
    """A layer's output holds NaN or inf, so a weight (or an input) does. `layer` and `position`
    (the first token whose output is not finite) say where it first showed (fast.py checks the
    last layer's output, then each layer's when that is not finite); `tinyoss info MODEL --scan`
    names the tensors holding NaN or inf."""

    def __init__(self, message: str, layer: int, position: int):
        super().__init__(message)
        self.layer, self.position = layer, position


def expect_type(value, types: type | tuple[type, ...], what: str):
    """`value` if it is one of `types` (bool is not an int here), else TinyossTypeError naming
    `what`: e.g. expect_type(path, (str, os.PathLike), "path")."""
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, types) and not (isinstance(value, bool) and bool not in types):
        return value
    names = " or ".join(t.__name__ for t in types)
    raise TinyossTypeError(f"{what} must be a {names}, got {type(value).__name__}")
