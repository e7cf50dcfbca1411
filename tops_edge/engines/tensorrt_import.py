"""The one place that imports TensorRT, so every TensorRT path fails the same way without it."""

from __future__ import annotations

from ..errors import BackendUnavailableError

HOW_TO_GET = ("on Jetson it comes with JetPack; elsewhere `pip install tensorrt --extra-index-url "
              "https://pypi.nvidia.com` (or `pip install tops-edge[trt]`)")


def require_tensorrt(what: str):
    """The `tensorrt` module, or BackendUnavailableError naming the package and how to get it."""
    try:
        import tensorrt
    except (ImportError, OSError, RuntimeError):  # absent, or PyPI's placeholder wheel without NVIDIA's index
        raise BackendUnavailableError(f"{what} needs the `tensorrt` Python package, which is not installed: {HOW_TO_GET}") from None
    return tensorrt
