"""The DPP greedy of dpp-merge and cdpruner as a TensorRT plugin, `tops::Select` (see reference.py for what it computes).

    import tops_edge.plugins
    tops_edge.plugins.load()   # before parsing a graph that holds the plugin node

`load()` needs the `tensorrt` package (>= 10.8) plus torch and triton; without TensorRT it raises
BackendUnavailableError with one line saying how to get it.
"""

from __future__ import annotations

PLUGIN_NAMESPACE = "tops"
PLUGIN_NAME = "Select"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"

_loaded = False


def load() -> str:
    """Register `tops::Select` with TensorRT's plugin registry (once per process); returns its id."""
    global _loaded
    from ..engines.tensorrt_import import require_tensorrt

    require_tensorrt("the tops::Select plugin")
    if not _loaded:
        from . import qdp  # noqa: F401  (the decorators register it)

        _loaded = True
    return PLUGIN_ID
