"""The Python runtime: backends behind one interface, the KV cache, sampling, the pipeline."""

from .backend import BACKENDS, get_backend
from .pipeline import GenerationResult, GenerationStream, Pipeline, StreamChunk

__all__ = ["BACKENDS", "GenerationResult", "GenerationStream", "Pipeline", "StreamChunk", "get_backend"]
