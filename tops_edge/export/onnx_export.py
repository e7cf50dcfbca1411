"""torch -> ONNX for one part, with the graph checks and external data the big models need."""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from ..models.base import PartSpec

EXPORTERS = ("legacy", "dynamo")
#: protobuf's hard limit is 2 GiB; stay well below it and move weights to one `.onnx.data` file
EXTERNAL_DATA_THRESHOLD = 1 << 30


def export_part(part: PartSpec, path: Path, opset: int, exporter: str = "legacy") -> list[str]:
    """Exports `part` to `path`; returns the file names written (graph, then external data if any).

    The exporter writes into a scratch folder of its own (the legacy one scatters one file per tensor
    above 2 GB); the graph is then re-saved as one `.onnx`, plus one `.onnx.data` when it is large.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter '{exporter}'; choose one of {', '.join(EXPORTERS)}")
    path = Path(path)
    args = part.example_inputs()
    common = dict(
        input_names=[s.name for s in part.inputs], output_names=[s.name for s in part.outputs],
        dynamic_axes=part.dynamic_axes(), opset_version=opset,
    )
    with tempfile.TemporaryDirectory(prefix=f".{part.name}-", dir=path.parent) as scratch:
        raw = Path(scratch) / "model.onnx"
        try:
            with torch.no_grad(), _quiet():
                if exporter == "legacy":
                    torch.onnx.export(part.module, args, str(raw), dynamo=False, do_constant_folding=True, **common)
                else:
                    torch.onnx.export(part.module, args, str(raw), dynamo=True, external_data=True,
                                      optimize=True, verify=False, **common)
        except Exception as exc:  # the exporters raise many types; one line names the part
            raise ExportError(f"exporting part '{part.name}' with the {exporter} exporter failed: {_first_line(exc)}") from exc
        return save_graph(raw, path)


def save_graph(src: Path, dst: Path) -> list[str]:
    """Loads `src` (with any external data) and writes it as `dst` (+ `dst.data` above the threshold)."""
    import onnx

    model = onnx.load(str(src), load_external_data=True)
    return save_model_proto(model, dst)


def save_model_proto(model, dst: Path) -> list[str]:
    import onnx

    data_name = dst.name + ".data"
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    return [dst.name] + ([data_name] if (dst.parent / data_name).exists() else [])


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


@contextlib.contextmanager
def _quiet():
    """The exporters print pages of tracer warnings; keep the terminal to our progress bar."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield


def opset_default() -> int:
    return int(os.environ.get("TOPS_EDGE_OPSET", "18"))
