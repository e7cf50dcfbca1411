"""Statistics and per-budget aggregation for `tops-bench`. Pure functions: no clocks, no models."""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable

#: the pipeline stages summarised per budget (GenerationResult.timings_ms keys) plus derived ones
STAGES = ("preprocess", "vision", "select", "prefill")


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's
    default). An empty input is an error: there is nothing to summarise."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of an empty sequence")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    return percentile(values, 50.0)


def summary(values: Iterable[float]) -> dict[str, float]:
    """{"median": ..., "p90": ...}, rounded to 4 decimals."""
    xs = list(values)
    return {"median": round(median(xs), 4), "p90": round(percentile(xs, 90.0), 4)}


def timed_calls(fn: Callable[[], object], warmup: int, runs: int,
                clock: Callable[[], float] = time.perf_counter,
                done: Callable[[], object] = lambda: None) -> list[tuple[object, float]]:
    """Call `fn` `warmup` times untimed, then `runs` times; returns [(result, wall ms)] of the timed
    calls. `done()` is called after each call, outside the timed span (a progress bar's tick)."""
    for _ in range(warmup):
        fn()
        done()
    out = []
    for _ in range(runs):
        t0 = clock()
        result = fn()
        out.append((result, (clock() - t0) * 1e3))
        done()
    return out


def aggregate(samples: list[tuple[object, float]]) -> dict:
    """Summarise timed runs of one budget. Each sample is (GenerationResult-like, wall ms): the result
    needs `timings_ms` (preprocess, vision, select, prefill, decode_per_token), `token_ids`,
    `kv_cache_bytes`, `prompt_tokens`, `finish_reason`, `stages`, `segment_prefill_ms` and
    `segment_kv_bytes`.

    ttft = preprocess + vision + select + prefill of the same run. TPOT is the pipeline's decode time
    per fed-back token; decode tokens/s is the total decode steps over the total decode time of all
    runs, from the real token counts (a run that stopped at EOS counts what it produced)."""
    if not samples:
        raise ValueError("no timed runs to aggregate")
    out: dict = {}
    for stage in STAGES:
        out[f"{stage}_ms"] = summary(r.timings_ms.get(stage, 0.0) for r, _ in samples)
    out["ttft_ms"] = summary(sum(r.timings_ms.get(s, 0.0) for s in STAGES) for r, _ in samples)
    steps = [max(len(r.token_ids) - 1, 0) for r, _ in samples]
    with_decode = [(r, n) for (r, _), n in zip(samples, steps) if n]
    out["tpot_ms"] = summary(r.timings_ms["decode_per_token"] for r, _ in with_decode) if with_decode else None
    decode_ms = sum(r.timings_ms["decode_per_token"] * n for r, n in with_decode)
    out["decode_tok_s"] = round(sum(steps) / (decode_ms / 1e3), 3) if decode_ms > 0 else None
    out["e2e_ms"] = summary(ms for _, ms in samples)
    # orchestration: the generate() wall time outside the backend's run calls and image preprocessing
    sessions = [r.timings_ms.get("sessions", 0.0) for r, _ in samples]
    out["sessions_ms"] = summary(sessions)
    out["overhead_pct"] = summary(
        100.0 * (ms - r.timings_ms.get("preprocess", 0.0) - busy) / busy if busy > 0 else 0.0
        for (r, ms), busy in zip(samples, sessions)
    )
    out["generated_tokens"] = [len(r.token_ids) for r, _ in samples]
    out["finish_reasons"] = [str(r.finish_reason) for r, _ in samples]
    out["kv_cache_bytes"] = int(max(r.kv_cache_bytes for r, _ in samples))
    out["prompt_tokens"] = int(samples[0][0].prompt_tokens)
    # the decoder's segments (one when uncut): each one's prefill step and the KV it holds
    segments = len(samples[0][0].segment_prefill_ms)
    out["segment_prefill_ms"] = [summary(r.segment_prefill_ms[i] for r, _ in samples) for i in range(segments)]
    out["segment_kv_bytes"] = [int(max(r.segment_kv_bytes[i] for r, _ in samples)) for i in range(segments)]
    out["stages"] = [{"layer": int(st["layer"]), "keep": int(st["keep"])} for st in samples[0][0].stages]
    return out
