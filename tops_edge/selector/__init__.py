"""Visual-token selectors: one registry; each method has a torch reference and an ONNX form."""

from . import methods as _methods  # noqa: F401  (registers every method)
from .base import SelectorInfo, available, check_keep, check_keep_ratio, get, keep_from_ratio, register, token_grid

__all__ = ["SelectorInfo", "available", "check_keep", "check_keep_ratio", "get", "keep_from_ratio", "register", "token_grid"]
