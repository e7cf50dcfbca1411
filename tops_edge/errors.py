"""Typed errors. The CLI turns every `TopsError` into one line on stderr and a non-zero exit."""

import numbers


class TopsError(Exception):
    """Base class of every error a user can cause or fix."""

    exit_code = 1


class ModelNotFoundError(TopsError):
    """The model id, alias or directory cannot be resolved to weights on this machine."""

    exit_code = 3


class CorruptModelError(TopsError):
    """A shipped checkpoint's files do not match the sha256 recorded beside them."""

    exit_code = 3


class UnsupportedModelError(TopsError):
    """The checkpoint exists but no adapter handles its model type."""

    exit_code = 3


class ExportError(TopsError):
    """Turning a part into ONNX failed."""

    exit_code = 4


class ManifestError(TopsError):
    """The export directory is missing, from another schema version, or its files do not match."""

    exit_code = 5


class InputError(TopsError):
    """Bad run-time input: an image that does not decode, a prompt without an image slot, a bad budget."""

    exit_code = 2


class ContextLengthError(InputError):
    """Prompt plus requested new tokens exceed the model's context."""


class BackendUnavailableError(TopsError):
    """The requested backend (or its package) is not installed on this machine."""

    exit_code = 6


def check_count(name: str, value, low: int) -> int:
    """`value` as an int if it is a whole number >= `low` (not a bool, not a float); else an InputError
    naming the option `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)
