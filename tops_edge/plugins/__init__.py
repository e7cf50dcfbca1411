"""The DPP greedy of dpp-merge and cdpruner as a TensorRT plugin, `tops::Select` (see reference.py for what it computes).

    import tops_edge.plugins
    tops_edge.plugins.load()   # before parsing a graph that holds the plugin node

A second plugin, `tops::PaperSelect`, runs the paper's TOPS greedy (selector/tops_paper.py; see
tops_paper_reference.py): `tops_edge.plugins.load_paper()` registers it.

`load()` needs the `tensorrt` package (>= 10.8) plus torch and triton; without TensorRT it raises
BackendUnavailableError with one line saying how to get it.
"""

from __future__ import annotations

PLUGIN_NAMESPACE = "tops"
PLUGIN_NAME = "Select"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
# the paper's TOPS greedy (selector/tops_paper.py) as a second plugin: tops_paper_qdp.py
PAPER_PLUGIN_NAME = "PaperSelect"
PAPER_PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PAPER_PLUGIN_NAME}"

_loaded = False
_paper_loaded = False


def load() -> str:
    """Register `tops::Select` with TensorRT's plugin registry (once per process); returns its id."""
    global _loaded
    from ..engines.tensorrt_import import require_tensorrt

    require_tensorrt("the tops::Select plugin")
    if not _loaded:
        from . import qdp  # noqa: F401  (the decorators register it)

        _loaded = True
    return PLUGIN_ID


def load_paper() -> str:
    """Register `tops::PaperSelect` (the paper's TOPS greedy) with TensorRT (once per process); its id."""
    global _paper_loaded
    from ..engines.tensorrt_import import require_tensorrt

    require_tensorrt("the tops::PaperSelect plugin")
    if not _paper_loaded:
        from . import tops_paper_qdp  # noqa: F401  (the decorators register it)

        _paper_loaded = True
    return PAPER_PLUGIN_ID
