"""torch -> ONNX for each part, the manifest, atomic output directories.

`export_model` is imported on first use: the runtime reads the manifest from here, and importing the
exporter with it (torch, the model adapters, the precision passes, which run the runtime) would
make export -> calib -> runtime -> export a circle.
"""

from .manifest import SCHEMA_VERSION, load_manifest

__all__ = ["export_model", "load_manifest", "SCHEMA_VERSION"]


def __getattr__(name):
    if name == "export_model":
        from .exporter import export_model

        return export_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
