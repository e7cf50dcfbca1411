"""The limits beside `tops-bench`'s figures: what the hardware allows a prefill and a decode step to cost.

Pure functions (by-hand checkable, see tests/test_llamacpp_peer.py) plus one measurement:

- `prefill_flops`: a decoder prefill's FLOPs, the sum over its segments of layers x (tokens x the
  per-token projections and MLP + attention's quadratic term). The FLOP-limit prefill ratio of a
  budget is its FLOPs over the unpruned prefill's: what the prefill time ratio would be if time were
  proportional to work. `attention="causal"` counts each query against the keys before it (the least
  work, L(L+1)/2 pairs); `"dense"` against every slot of a cache of L + `extra_slots` (what an
  attention over a fixed-size cache computes, masked or not).
- `decode_limit_ms`: the weight-read limit of one decode step: every weight byte read once per token,
  at the measured memory bandwidth. A step can be no faster (short of keeping weights in cache).
- `memory_bandwidth`: a numpy copy benchmark (STREAM "copy": bytes read + bytes written per second,
  the best of a few repeats over buffers well above the last-level cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class DecoderShape:
    """A Llama-style decoder's shape: what its FLOPs per token depend on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_manifest(cls, manifest: dict) -> "DecoderShape":
        """From an export's manifest: the decoder section and the `footprint` (intermediate size);
        the query heads are hidden_size / head_dim (Llama, Mistral, Qwen2 and Vicuna alike)."""
        dec, fp = manifest["decoder"], manifest.get("footprint") or {}
        hidden, head_dim = int(dec["hidden_size"]), int(dec["head_dim"])
        if "intermediate_size" not in fp:
            raise ValueError("the manifest's footprint has no intermediate_size (an export from before it was recorded)")
        return cls(
            num_layers=int(dec["num_layers"]), hidden_size=hidden, intermediate_size=int(fp["intermediate_size"]),
            num_heads=int(fp.get("num_heads", hidden // head_dim)), num_kv_heads=int(dec["num_kv_heads"]),
            head_dim=head_dim, vocab_size=int(dec["vocab_size"]),
        )

    def linear_flops_per_token(self) -> int:
        """One layer, one token: q, k, v, o projections and the gated MLP (gate, up, down), 2 FLOPs per MAC."""
        h, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        return 2 * (h * q + 2 * h * kv + q * h + 3 * h * i)

    def attention_flops_per_pair(self) -> int:
        """One layer, one query-key pair: q.k and the weighted v, over every query head."""
        return 2 * 2 * self.num_heads * self.head_dim

    def lm_head_flops(self) -> int:
        return 2 * self.hidden_size * self.vocab_size


def attention_pairs(tokens: int, attention: str = "causal", extra_slots: int = 0) -> int:
    """Query-key pairs a prefill of `tokens` scores: causal L(L+1)/2, or dense L x (L + extra_slots)."""
    if attention == "causal":
        return tokens * (tokens + 1) // 2
    if attention == "dense":
        return tokens * (tokens + extra_slots)
    raise ValueError(f"attention must be 'causal' or 'dense', got {attention!r}")


def prefill_flops(shape: DecoderShape, segments, attention: str = "causal", extra_slots: int = 0) -> int:
    """FLOPs of one prefill. `segments` is [(layers, tokens)] in order: each decoder segment's layer
    count and the tokens it prefills (one segment when no pruning inside the LLM). The logits are
    the last position's only (as the exported decoders compute them)."""
    total = 0
    for layers, tokens in segments:
        per_layer = tokens * shape.linear_flops_per_token() + \
            attention_pairs(tokens, attention, extra_slots) * shape.attention_flops_per_pair()
        total += int(layers) * per_layer
    return total + shape.lm_head_flops()


def segment_tokens(segment_layers, stages, prompt_tokens: int, num_visual: int) -> list[tuple[int, int]]:
    """[(layers, tokens)] of a budget's prefill from its report entry: `segment_layers` [(first, last)]
    of each decoder segment, `stages` [{layer, keep}] (0 = before the LLM), `prompt_tokens` the first
    segment's length. A segment starting at layer a holds the visual tokens of the last stage at or
    before a; the other tokens (text, LLaVA-NeXT row newlines) pass through every segment."""
    stages = sorted(stages, key=lambda st: st["layer"])
    others = other_tokens(stages, prompt_tokens, num_visual)
    out = []
    for a, b in segment_layers:
        kept = [st["keep"] for st in stages if st["layer"] <= a]
        out.append((b - a, others + (kept[-1] if kept else num_visual)))
    return out


def other_tokens(stages, prompt_tokens: int, num_visual: int) -> int:
    """The prefill's tokens that no stage prunes (text, LLaVA-NeXT row newlines): the first
    segment's length less the visual tokens it holds (the layer-0 stage's keep, else all)."""
    first = [st["keep"] for st in stages if st["layer"] == 0]
    return prompt_tokens - (first[-1] if first else num_visual)


def decode_limit_ms(weight_bytes: int, bandwidth_bytes_s: float) -> float:
    """The weight-read limit of one decode step, in ms."""
    if bandwidth_bytes_s <= 0:
        raise ValueError("the memory bandwidth must be positive")
    return 1e3 * weight_bytes / bandwidth_bytes_s


def decoder_weight_bytes(manifest: dict) -> int:
    """The bytes of every decoder segment's graph files: the weights one decode step reads once (the
    embedding table is a separate graph that reads one row per token)."""
    parts = manifest["parts"]
    return int(sum(f["bytes"] for seg in manifest["decoder"]["segments"] for f in parts[seg["part"]]["files"]))


def ratio(value, reference):
    """value / reference rounded to 4 places; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return round(float(value) / float(reference), 4)


@dataclass(frozen=True)
class Bandwidth:
    bytes_per_s: float
    method: str

    @property
    def gb_s(self) -> float:
        return self.bytes_per_s / 1e9


def memory_bandwidth(mib: int = 256, repeats: int = 7, clock=time.perf_counter) -> Bandwidth:
    """Copy `mib` MiB between two numpy buffers `repeats` times; the best copy's (read + written
    bytes) / seconds. One thread, as numpy copies: on a small CPU one core can nearly fill the memory
    bus; on a large one this under-reads it (the limit is then optimistic, not pessimistic)."""
    import numpy as np

    n = mib * 2**20 // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        np.copyto(dst, src)
        best = min(best, clock() - t0)
    return Bandwidth(2 * src.nbytes / best, f"numpy copy of {mib} MiB, best of {repeats}, (read + write) / s")
