"""Typed errors. The CLI turns every `TopsError` into one line on stderr and a non-zero exit."""


class TopsError(Exception):
    """Base class of every error a user can cause or fix."""

    exit_code = 1


class ModelNotFoundError(TopsError):
    """The model id, alias or directory cannot be resolved to weights on this machine."""

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
