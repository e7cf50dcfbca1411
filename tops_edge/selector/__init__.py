"""Visual-token selectors: one registry, each method a torch module that also exports to ONNX."""

from .base import SelectorInfo, available, check_keep, gather_tokens, get, register, register_identity
from . import uniform as _uniform  # noqa: F401  (registers `uniform`)

register_identity("none", "keep every visual token (no pruning)")

__all__ = ["SelectorInfo", "available", "check_keep", "gather_tokens", "get", "register"]
