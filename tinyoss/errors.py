"""Every error tinyoss raises on bad input derives from TinyossError.

The CLI catches TinyossError and prints its one-line message (no traceback), so each message names
the file, tensor, field or argument that is wrong.
"""


class TinyossError(Exception):
    """Base class of all errors tinyoss raises for bad input."""


class ConfigError(TinyossError):
    """A config.json is missing, not JSON, or has a missing/invalid key."""


class CheckpointError(TinyossError):
    """A checkpoint file is missing, truncated, corrupt, or does not match the config."""


class NonFiniteError(TinyossError):
    """A layer's output holds NaN or inf, so a weight (or an input) does. `layer` and `position`
    (the first token whose output is not finite) say where it first showed (fast.py checks after
    every layer); `tinyoss info MODEL --scan` names the tensors holding NaN or inf."""

    def __init__(self, message: str, layer: int, position: int):
        super().__init__(message)
        self.layer, self.position = layer, position
