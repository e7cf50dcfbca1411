"""TensorRT engines from a tops-export directory (`tops-build`), built on the device they run on.

Everything that imports TensorRT does so lazily through tensorrt_import.require_tensorrt, so the
package imports, plans and is tested on machines without it.
"""

from .tensorrt_import import require_tensorrt

__all__ = ["require_tensorrt"]
