"""Build-time memory: the host RAM `tops-export` needs and the device RAM `tops-build` needs, per
precision and preset. Estimates, printed beside the run-time plan (`--dry-run`); they refuse nothing.

Host RAM to export (the host, not the device):
    export   the torch model in fp32 (every parameter x 4 B: the exporter loads it so) + EXPORT_OVERHEAD,
             the torch.onnx trace and the graph written tensor by tensor beside it
    passes   a precision other than fp32 converts the fp32 graphs after the torch model is released:
             PASS_FACTOR[precision] x the fp32 bytes of the largest part it converts (the decoder)
  The peak is the larger of the two. EXPORT_OVERHEAD and PASS_FACTOR were measured with
  scripts/export_memory.py on LLaVA models with Llama-2-7B layer shapes and 3-4 decoder layers, peak
  RSS per phase in a fresh process, lines fitted over the layers (docs/design.md). The passes load the
  whole fp32 graph and write the converted one beside it, so they, not the torch export, set the peak.

Device RAM to build (on a Jetson CPU and GPU share it; on a discrete GPU the two host-side copies
below are the host's, not the GPU's), one engine at a time, the largest part:
    the graph's weights as stored in the export (the ONNX parser holds them, host side)
  + the engine's weights at the build precision (the builder's copy, device side)
  + the serialized engine (TensorRT's host buffer, about the engine's weights)
  + the preset's workspace and reserve.
  Our reading of how TensorRT builds, not measured (no TensorRT here). The parser's and the
  serialized engine's copies are ordinary host memory; the builder's copy and the workspace are not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from .devices import GIB, DevicePreset
from .footprint import Footprint
from .memory import INT4_BLOCK, WEIGHT_BYTES

EXPORT_OVERHEAD = int(1.95 * GIB)  # measured: the 32-layer fit 27.11 GiB less that model's 25.17 GiB of fp32 weights
#: a pass's peak over the fp32 bytes of the decoder graph it converts, measured with
#: `scripts/export_memory.py --layers 3,4 --precisions fp16,int8-wo,int4-wo-rtn` (7B layer shapes; the
#: 32-layer fits 62.1 / 50.3 / 57.6 GiB against the 24.6 GiB fp32 decoder). int4-wo's default AWQ runs
#: the fp32 pipeline to capture activations first: at 3 layers its peak reached 13.1 GiB (1.58x RTN's
#: 8.3 GiB there) before that run failed (the statistics then serialized the >2 GB graph in memory, fixed
#: since: calib/int4.py reads the graph's file), so its factor is RTN's x 1.58, a lower bound from one
#: point, not a measured whole pass. int8 (Q/DQ) was not measured; it also runs the fp32 pipeline to
#: calibrate, so it takes AWQ's factor.
RTN_FACTOR = 2.34
AWQ_CAPTURE = 1.58
PASS_FACTOR = {"fp16": 2.52, "int8-wo": 2.04, "int4-wo": round(RTN_FACTOR * AWQ_CAPTURE, 2), "int8": round(RTN_FACTOR * AWQ_CAPTURE, 2)}
#: bytes per parameter as the export stores them (vision matmul, vision other, embed, decoder matmul,
#: decoder other): int8 / int8-wo / int4-wo keep everything but their quantized weights fp32 in the graph
GRAPH_BYTES = {
    "fp32": (4, 4, 4, 4, 4),
    "fp16": (2, 2, 2, 2, 2),
    "int8-wo": (4, 4, 4, 1, 4),
    "int8": (1, 4, 4, 1, 4),
    "int4-wo": (4, 4, 4, Fraction(1, 2) + Fraction(4, INT4_BLOCK), 4),
}


@dataclass
class BuildPlan:
    precision: str
    device: DevicePreset
    host: list[tuple[str, int, str]] = field(default_factory=list)  # (phase, bytes, how)
    device_rows: list[tuple[str, int, str]] = field(default_factory=list)
    largest_part: str = "decoder"

    @property
    def host_peak(self) -> int:
        return max(b for _, b, _ in self.host)

    @property
    def device_peak(self) -> int:
        """What the build needs of the device's memory: everything on a Jetson (CPU and GPU share it),
        only the builder's copy, workspace and reserve on a discrete GPU (the rest is the host's)."""
        total = sum(b for _, b, _ in self.device_rows)
        return total if self.device.unified_memory else total - self.pageable

    @property
    def pageable(self) -> int:
        """The part of the device peak in ordinary host memory (the parser's and the serialized engine's copies)."""
        return sum(b for item, b, _ in self.device_rows if item.startswith(("graph weights", "serialized engine")))

    @property
    def build_fits(self) -> bool:
        return self.device_peak <= self.device.memory_bytes

    def to_json(self) -> dict:
        return {"host_export_bytes": self.host_peak, "device_build_bytes": self.device_peak, "part": self.largest_part,
                "build_fits": self.build_fits, "host": [{"phase": i, "bytes": b, "how": h} for i, b, h in self.host],
                "device": [{"item": i, "bytes": b, "how": h} for i, b, h in self.device_rows]}


def _part_bytes(fp: Footprint, per: tuple, head_bytes=None) -> dict[str, int]:
    vm, vo, eb, dm, do = per
    head = fp.vocab_size * fp.hidden_size
    hb = dm if head_bytes is None else head_bytes
    return {"vision": math.ceil(fp.vision_matmul * vm + fp.vision_other * vo), "embed": math.ceil(fp.embed * eb),
            "decoder": math.ceil((fp.decoder_matmul - head) * dm + head * hb + fp.decoder_other * do)}


def plan_build(fp: Footprint, device: DevicePreset, precision: str, export_precision: str | None = None) -> BuildPlan:
    """The build-time estimate of `precision` (a memory-plan precision) on `device`; the graphs the
    parser reads are stored at `export_precision` (default: the same; an fp32 export built fp16: fp32)."""
    plan = BuildPlan(precision, device)
    fp32 = 4 * fp.parameters
    plan.host.append(("export (torch, fp32)", fp32 + EXPORT_OVERHEAD,
                      f"{fp.parameters / 1e9:.2f}B parameters x 4 B + {EXPORT_OVERHEAD / GIB:.2f} GiB"))
    if precision in PASS_FACTOR:
        decoder32 = _part_bytes(fp, GRAPH_BYTES["fp32"])["decoder"]
        how = f"{PASS_FACTOR[precision]:g} x the fp32 decoder graph ({decoder32 / GIB:.2f} GiB)"
        if precision == "int4-wo":
            how += f"; --int4-method rtn: {RTN_FACTOR:g} x, {RTN_FACTOR * decoder32 / GIB:.1f} GiB"
        plan.host.append((f"{precision} passes", math.ceil(PASS_FACTOR[precision] * decoder32), how))
    # int8 (Q/DQ) leaves the LM head float: fp32 in the graph, fp16 in the engine
    stored = export_precision or precision
    graph = _part_bytes(fp, GRAPH_BYTES[stored], 4 if stored == "int8" else None)
    engine = _part_bytes(fp, WEIGHT_BYTES[precision], 2 if precision == "int8" else None)
    part = max(engine, key=lambda p: graph[p] + 2 * engine[p])
    plan.largest_part = part
    plan.device_rows = [
        (f"graph weights ({part})", graph[part], "the export's ONNX weights, held by the parser"),
        (f"engine weights ({part})", engine[part], f"{precision} in the engine, the builder's copy"),
        (f"serialized engine ({part})", engine[part], "TensorRT's host buffer"),
        ("TensorRT workspace", device.workspace_bytes, "preset"),
        ("reserved (OS, CUDA, libraries)", device.reserved_bytes, "preset"),
    ]
    return plan


def format_build(plan: BuildPlan) -> str:
    d = plan.device
    lines = ["build-time memory (estimates; docs/tensorrt.md#build-time-memory):",
             f"  {'host RAM to export':<32}{plan.host_peak / GIB:>8.2f}  the larger of:"]
    lines += [f"    {item:<30}{b / GIB:>8.2f}  {how}" for item, b, how in plan.host]
    lines.append(f"  {'device RAM to build':<32}{plan.device_peak / GIB:>8.2f}  the largest engine ({plan.largest_part}), "
                 f"one at a time:")
    lines += [f"    {item:<30}{b / GIB:>8.2f}  {how}" for item, b, how in plan.device_rows]
    if not d.unified_memory:
        lines.append(f"    (a discrete GPU: the parser's and the serialized engine's {plan.pageable / GIB:.2f} GiB are "
                     "the host's RAM, not counted against the GPU)")
    if plan.build_fits:
        lines.append(f"  build: fits {d.name} ({(d.memory_bytes - plan.device_peak) / GIB:.2f} GiB spare)")
    else:
        over = plan.device_peak - d.memory_bytes
        lines.append(f"  build: {over / GIB:.2f} GiB over {d.name}'s {d.memory_gib:g} GiB by this estimate; "
                     f"{plan.pageable / GIB:.2f} GiB of it is ordinary host memory that swap can hold")
    return "\n".join(lines)
