"""torch -> ONNX for one part, with the graph checks and external data the big models need."""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import ExportError
from ..models.base import PartSpec
from . import shapes

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
    if part.onnx_model is not None:
        return _save_built(part, path)
    module = part.module.eval()
    args = part.example_inputs()
    names = dict(input_names=[s.name for s in part.inputs], output_names=[s.name for s in part.outputs], opset_version=opset)
    with tempfile.TemporaryDirectory(prefix=f".{part.name}-", dir=path.parent) as scratch:
        raw = Path(scratch) / "model.onnx"
        try:
            with torch.no_grad(), _quiet():
                if exporter == "legacy":
                    torch.onnx.export(module, args, str(raw), dynamo=False, do_constant_folding=True,
                                      dynamic_axes=part.dynamic_axes(), **names)
                else:
                    torch.onnx.export(module, args, str(raw), dynamo=True, external_data=True, optimize=True,
                                      verify=False, dynamic_shapes=_dynamic_shapes(part), **names)
            files = save_graph(raw, path)
            if shapes.applies(part.name):  # the traced shape arithmetic, proven constant (TOPS_EDGE_SHAPE_PASS=0: off)
                shapes.simplify_file(path)
            return files
        except Exception as exc:  # the exporters raise many types; one line names the part
            raise ExportError(f"exporting part '{part.name}' with the {exporter} exporter failed: {_first_line(exc)}") from exc


def _save_built(part: PartSpec, path: Path) -> list[str]:
    import onnx

    with tempfile.TemporaryDirectory(prefix=f".{part.name}-", dir=path.parent) as scratch:
        try:
            raw = Path(scratch) / "model.onnx"
            onnx.save_model(part.onnx_model(), str(raw))
            return save_graph(raw, path)
        except Exception as exc:
            raise ExportError(f"building part '{part.name}' failed: {_first_line(exc)}") from exc


def _dynamic_shapes(part: PartSpec) -> tuple:
    """torch.export's dynamic_shapes for the part's inputs; a `*past` parameter is one tuple input."""
    from torch.export import Dim

    axes = part.dynamic_axes()
    shapes = [{i: Dim.DYNAMIC for i in axes[s.name]} for s in part.inputs]
    params = list(inspect.signature(part.module.forward).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        n = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        shapes = [*shapes[:n], tuple(shapes[n:])]
    return tuple(shapes)


def save_graph(src: Path, dst: Path) -> list[str]:
    """Writes the exported graph at `src` as `dst`, plus one `dst.data` when its weights are large.

    Weights the exporter already put outside the protobuf (one file per tensor from the legacy
    exporter, one `.data` file from dynamo) are streamed into `dst.data` tensor by tensor, never loaded:
    the peak host RAM of a 7B export stays near the torch model's own size.
    """
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    data_path = dst.parent / (dst.name + ".data")
    data_path.unlink(missing_ok=True)  # onnx appends to an existing data file
    model = onnx.load(str(src), load_external_data=False)
    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    if external:
        with open(data_path, "wb") as out:
            for tensor in external:
                info = ExternalDataInfo(tensor)
                offset = out.tell()
                with open(src.parent / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    length = _copy_bytes(f, out, info.length)
                del tensor.external_data[:]
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
        onnx.save_model(model, str(dst))
    elif sum(t.ByteSize() for t in model.graph.initializer) >= EXTERNAL_DATA_THRESHOLD:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst))
    files = [dst] + ([data_path] if data_path.exists() else [])
    umask = os.umask(0)
    os.umask(umask)
    for f in files:  # onnx creates data files private; exports are ordinary files
        os.chmod(f, 0o666 & ~umask)
    return [f.name for f in files]


def _copy_bytes(src, dst, length: int | None, chunk: int = 1 << 24) -> int:
    done = 0
    while length is None or done < length:
        block = src.read(chunk if length is None else min(chunk, length - done))
        if not block:
            break
        dst.write(block)
        done += len(block)
    return done


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
