"""The memory planner: weights per precision + KV cache + activations + workspace + reserve vs the device.

    weights      parameters x bytes per precision (below), per part
    KV cache     1 buffer x 2 (K, V) x layers x kv_heads x head_dim x kv bytes x context tokens
                 (one fixed-size buffer per tensor: the decoder reads the past in place and returns
                 only the step's new rows, which the runtime writes into it; see runtime/backend.py;
                 context = min(device preset, model))
    activations  the decoder's largest prefill: tokens x (4 hidden + 2 intermediate) x bytes, plus
                 the fp32 logits row; tokens = the visual tokens per image + MAX_PROMPT_TEXT_TOKENS
                 (the engines' optimization profile, see profiles.py)
    workspace    the preset's TensorRT workspace limit, counted in full
    reserved     the preset's OS + CUDA + TensorRT libraries

Bytes per parameter (vision matmul, vision other, embed, decoder matmul, decoder other):
  fp32 4 4 4 4 4; fp16 2 2 2 2 2; int8-wo (weight-only INT8 decoder) 2 2 2 1 2; int8 (Q/DQ on every
  MatMul/Gemm but the LM head, which stays float: 2 B; the rest fp16) 1 2 2 1 2; int4-wo (weight-only
  INT4 decoder, calib/int4.py) 2 2 2 0.53125 2: 4 bits a weight + one fp32 scale per block of 128 input channels (4 / 128 B a weight;
  the scales are counted here because they are 6% of the INT4 bytes; rounded up to whole bytes per
  part). KV cache and activations are fp32 at fp32, else fp16 (the KV element size can be given
  instead: an export's KV IO dtype, which tops-build uses). INT8 per-channel scales (one fp32 per
  output channel) are left out: < 0.1% of the weights.

The LM head's workspace (`lm_head_chunks`): a TensorRT build gives each GEMM tactic scratch memory
out of the preset's workspace limit, and a GEMM over a whole 150k vocabulary asks for more than an
Orin Nano's. Nothing here can measure that (no TensorRT), so the estimate is a reading of the one
figure known: Edge-LLM's Orin Nano build of Qwen3-VL-2B, whose 2048 x 151936 LM-head MatMul "asks
for about 1 GiB of contiguous workspace" (shared/docs/ANCHORS.md), which is its weight at 4 B a value
(1.16 GiB). So: head workspace = vocab x hidden x 4 B, and the head is exported as
ceil(that / preset workspace) MatMuls over consecutive vocabulary slices (rows rounded up to
multiples of 128, models/base.py ChunkedLMHead): the same logits, no GEMM over the preset's limit.
`tops-export --lm-head-chunks N` overrides it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction

from ..errors import InputError
from .devices import GIB, DevicePreset
from .footprint import Footprint

#: by fidelity, best first: a refusal names the first one that fits
PLAN_PRECISIONS = ("fp32", "fp16", "int8-wo", "int8", "int4-wo")
INT4_BLOCK = 128  # calib/int4.py BLOCK_SIZE
WEIGHT_BYTES = {
    "fp32": (4, 4, 4, 4, 4),
    "fp16": (2, 2, 2, 2, 2),
    "int8-wo": (2, 2, 2, 1, 2),
    "int8": (1, 2, 2, 1, 2),
    "int4-wo": (2, 2, 2, Fraction(1, 2) + Fraction(4, INT4_BLOCK), 2),  # 17/32 B: 4 bits + an fp32 scale per 128
}
MAX_PROMPT_TEXT_TOKENS = 512  # text tokens of one prompt the engines are built for, besides the image
HEAD_WORKSPACE_BYTES = 4  # a head GEMM's workspace per weight value (the reading above)
VOCAB_ALIGN = 128  # rows of a vocabulary chunk: multiples of this, the last chunk what is left


def lm_head_workspace(fp: Footprint) -> int:
    """Our estimate of the TensorRT workspace the unsplit LM-head GEMM asks for (module docstring)."""
    return fp.vocab_size * fp.hidden_size * HEAD_WORKSPACE_BYTES


def lm_head_chunks(fp: Footprint, device: DevicePreset) -> int:
    """How many vocabulary chunks keep each head GEMM within the preset's workspace (1: no split)."""
    return len(vocabulary_chunks(fp.vocab_size, math.ceil(lm_head_workspace(fp) / device.workspace_bytes)))


def vocabulary_chunks(vocab_size: int, chunks: int) -> list[int]:
    """Rows per chunk: up to `chunks` consecutive slices of the vocabulary, each but the last a
    multiple of VOCAB_ALIGN rows, the last what is left (fewer chunks where the rounding uses the
    vocabulary up first)."""
    if chunks < 1:
        raise InputError(f"--lm-head-chunks must be at least 1, got {chunks}")
    size = math.ceil(vocab_size / chunks / VOCAB_ALIGN) * VOCAB_ALIGN
    if chunks == 1 or size >= vocab_size:
        return [vocab_size]
    full, rest = divmod(vocab_size, size)
    return [size] * full + ([rest] if rest else [])


class DoesNotFitError(InputError):
    """The model at this precision needs more memory than the device has."""


def activation_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


@dataclass
class MemoryPlan:
    model: str
    device: DevicePreset
    precision: str
    context: int
    prefill_tokens: int
    rows: list[tuple[str, int, str]] = field(default_factory=list)  # (item, bytes, how it was counted)
    head_workspace: int = 0  # lm_head_workspace
    head_chunks: int = 1  # lm_head_chunks: vocabulary chunks an export for this device splits the LM head into

    @property
    def total(self) -> int:
        return sum(b for _, b, _ in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.device.memory_bytes

    def to_json(self) -> dict:
        return {"model": self.model, "device": self.device.name, "precision": self.precision, "context": self.context,
                "prefill_tokens": self.prefill_tokens, "rows": [{"item": i, "bytes": b, "how": h} for i, b, h in self.rows],
                "total_bytes": self.total, "device_bytes": self.device.memory_bytes, "fits": self.fits,
                "lm_head": {"workspace_bytes": self.head_workspace, "chunks": self.head_chunks}}


def plan_memory(fp: Footprint, device: DevicePreset, precision: str, model: str = "model",
                context: int | None = None, kv_bytes: int | None = None) -> MemoryPlan:
    """`kv_bytes` overrides the precision's KV-cache element size (an export's KV IO dtype)."""
    if precision not in WEIGHT_BYTES:
        raise InputError(f"precision '{precision}' is not one the planner knows; choose {', '.join(PLAN_PRECISIONS)}")
    context = min(device.max_context, fp.max_context) if context is None else int(context)
    vm, vo, eb, dm, do = WEIGHT_BYTES[precision]
    act = activation_bytes(precision)
    kv_bytes = kv_bytes or act
    prefill = min(context, fp.tokens_per_image + MAX_PROMPT_TEXT_TOKENS)  # no prompt is longer than the context
    head = fp.vocab_size * fp.hidden_size  # the LM head's weights (part of decoder_matmul)
    hb = 2 if precision == "int8" else dm  # Q/DQ int8 leaves the head float (calib/passes.py): fp16 in the engine
    plan = MemoryPlan(model, device, precision, context, prefill, head_workspace=lm_head_workspace(fp),
                      head_chunks=lm_head_chunks(fp, device))
    m = lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
    b = lambda x: f"{float(x):g}"  # noqa: E731  (17/32 -> 0.53125)
    plan.rows = [
        ("weights: vision", math.ceil(fp.vision_matmul * vm + fp.vision_other * vo),
         f"{m(fp.vision_matmul)} matmul x {b(vm)} B + {m(fp.vision_other)} other x {b(vo)} B"),
        ("weights: embed", math.ceil(fp.embed * eb), f"{m(fp.embed)} x {b(eb)} B"),
        ("weights: decoder", math.ceil((fp.decoder_matmul - head) * dm + head * hb + fp.decoder_other * do),
         (f"{m(fp.decoder_matmul)} matmul x {b(dm)} B" if hb == dm else
          f"{m(fp.decoder_matmul - head)} matmul x {b(dm)} B + {m(head)} LM head x {b(hb)} B")
         + f" + {m(fp.decoder_other)} other x {b(do)} B"),
        ("KV cache", 2 * fp.num_layers * fp.num_kv_heads * fp.head_dim * kv_bytes * context,
         f"1 buffer x 2 x {fp.num_layers} layers x {fp.num_kv_heads} heads x {fp.head_dim} x {kv_bytes} B x {context} tokens"),
        ("activations", prefill * (4 * fp.hidden_size + 2 * fp.intermediate_size) * act + fp.vocab_size * 4,
         f"{prefill} tokens x (4 x {fp.hidden_size} + 2 x {fp.intermediate_size}) x {act} B + logits"),
        ("TensorRT workspace", device.workspace_bytes, "preset"),
        ("reserved (OS, CUDA, libraries)", device.reserved_bytes, "preset"),
    ]
    return plan


def format_plan(plan: MemoryPlan) -> str:
    d = plan.device
    lines = [
        f"memory plan: {plan.model} on {d.name} ({d.summary}), {plan.precision}, context {plan.context} tokens, "
        f"prefill up to {plan.prefill_tokens} tokens",
        f"  {'item':<32}{'GiB':>8}  how",
    ]
    lines += [f"  {item:<32}{b / GIB:>8.2f}  {how}" for item, b, how in plan.rows]
    lines.append(f"  {'total':<32}{plan.total / GIB:>8.2f}")
    lines.append(f"  {'device memory':<32}{d.memory_bytes / GIB:>8.2f}")
    spare = d.memory_bytes - plan.total
    verdict = f"fits ({spare / GIB:.2f} GiB spare)" if plan.fits else f"does NOT fit ({-spare / GIB:.2f} GiB over)"
    lines.append(f"  verdict: {verdict}")
    head = "one MatMul" if plan.head_chunks == 1 else f"{plan.head_chunks} MatMuls over vocabulary slices"
    lines.append(f"  LM head: ~{plan.head_workspace / GIB:.2f} GiB of GEMM workspace unsplit (estimate; preset limit "
                 f"{d.workspace_gib:g}): {head}")
    return "\n".join(lines)


def check_fits(fp: Footprint, device: DevicePreset, precision: str, model: str = "model",
               context: int | None = None, kv_bytes: int | None = None) -> MemoryPlan:
    """The plan, or DoesNotFitError with one line naming the best precision that would fit."""
    plan = plan_memory(fp, device, precision, model, context, kv_bytes)
    if plan.fits:
        return plan
    need = f"{model} at {precision} needs {plan.total / GIB:.1f} GiB on {device.name} ({device.memory_gib:g} GiB)"
    for other in PLAN_PRECISIONS[PLAN_PRECISIONS.index(precision) + 1:]:
        alt = plan_memory(fp, device, other, model, context, kv_bytes)
        if alt.fits:
            raise DoesNotFitError(f"{need}; --precision {other} would fit ({alt.total / GIB:.1f} GiB)")
    smallest = plan_memory(fp, device, PLAN_PRECISIONS[-1], model, context, kv_bytes)
    raise DoesNotFitError(f"{need}; no precision fits it (the smallest, {PLAN_PRECISIONS[-1]}, needs "
                          f"{smallest.total / GIB:.1f} GiB): choose a larger --device")
