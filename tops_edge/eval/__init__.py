"""Fidelity evaluation: ShapesVQA and user JSONL tasks through the exported ONNX pipeline."""

from .report import format_table, write_json, write_plot
from .runner import SCHEMA, run_eval
from .tasks import Item, load_task, score

__all__ = ["SCHEMA", "Item", "format_table", "load_task", "run_eval", "score", "write_json", "write_plot"]
