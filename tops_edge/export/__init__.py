"""torch -> ONNX for each part, the manifest, atomic output directories."""

from .exporter import export_model
from .manifest import SCHEMA_VERSION, load_manifest

__all__ = ["export_model", "load_manifest", "SCHEMA_VERSION"]
