"""The `tops-bench` report: its JSON schema, a validator, the terminal table, CSV and PNG writers.

JSON schema ("tops-bench/3"; 2 added the selectors, stages and decoder segments, 3 the limits and
--compare llama.cpp). `Stat` is {"median": float, "p90": float} (linear-interpolated percentiles over
the timed runs, milliseconds unless named otherwise):

    schema            str    "tops-bench/3"
    created_utc       str    ISO-8601 time the run started
    directory         str    the export directory (absolute)
    settings          {keeps [int], runs int, warmup int, prompt_len int (asked for),
                       prompt_text_tokens int (the question's tokens as built), new_tokens int,
                       image str, compare str|null, budget str (how K splits over NeXT crops),
                       selectors [str] (timed side by side at each budget), cuts [int] (the export's
                       decoder cuts), gguf str|null (--compare llama.cpp: the GGUF folder)}
    device            {cpu str, logical_cores int, platform str, ort_intra_op_threads int (0 = ORT
                       default), ort_providers [str] (in use), ort_available_providers [str],
                       gpu str|null, jetson_power_mode str|null (`nvpmodel -q`), versions {str: str|null},
                       model_source str, selector str, positions str, num_visual_tokens int (the
                       bench image's tokens a budget chooses among), num_visual_tokens_total int (with
                       tokens always kept: LLaVA-NeXT's row newlines), rss_method str (how peak_rss_bytes was measured)}
    budgets           one per budget and selector, budgets in the order asked, selectors within each:
                      {keep int (T: visual tokens kept on average over the decoder's layers; before
                       the LLM, its K), selector str, stages [{layer int, keep int}] (each pruning
                       stage that ran: 0 = before the LLM), prompt_tokens int (the first segment's
                       prefill length, kept visual tokens included),
                       preprocess_ms Stat, vision_ms Stat, select_ms Stat, prefill_ms Stat,
                       ttft_ms Stat (preprocess+vision+select+prefill of each run),
                       tpot_ms Stat|null (decode ms per token), decode_tok_s float|null (all decode
                       steps / all decode time), e2e_ms Stat (wall time of generate()),
                       sessions_ms Stat (time inside the backend's run calls), overhead_pct Stat
                       (orchestration: e2e - preprocess - sessions, in % of sessions),
                       generated_tokens [int] (per timed run), finish_reasons [str] ("eos"|"length"),
                       kv_cache_bytes int (all segments), segment_prefill_ms [Stat] and segment_kv_bytes
                       [int] (per decoder segment, one when uncut), peak_rss_bytes int|null, gpu_peak_bytes int|null,
                       hf_e2e_ratio float|null (ours / HF median e2e; only with --compare hf),
                       select_share_pct Stat (the selection's share of each run's TTFT, %),
                       limits null (no decoder shape in the manifest) | {prefill_flops int (causal
                       attention), prefill_flops_dense int (attention over the whole fixed-size cache,
                       as the exported decoder computes it), unpruned_prefill_flops int, flop_ratio
                       float (prefill_flops / unpruned: the FLOP-limit prefill ratio), prefill_ratio
                       float|null (measured median prefill / the unpruned budget's, same selector),
                       prefill_vs_limit float|null (prefill_ratio / flop_ratio), prefill_gflop_s
                       float|null (prefill_flops / the median prefill), tpot_limit_ms float
                       (decoder weight bytes / memory bandwidth), tpot_vs_limit float|null (TPOT median /
                       tpot_limit_ms)},
                       peer null | with --compare llama.cpp, llama.cpp's runs alternating with these
                       (unpruned): {preprocess_ms, vision_ms, prefill_ms, ttft_ms Stat, tpot_ms Stat|null,
                       e2e_ms Stat, generated_tokens [int], prompt_tokens int, ratios {vision, prefill,
                       ttft, tpot, e2e: Stat|null} (ours / llama.cpp per pair of runs; below 1 = ours faster),
                       prefill_gflop_s float|null (the unpruned prefill's causal FLOPs / its median prefill),
                       tpot_vs_limit float|null (its TPOT / its weight-read limit)}}
    hf                null, or with --compare hf: {model_source str, config_matches_export bool|null,
                       attn_implementation str, torch_threads int, e2e_ms Stat, generated_tokens [int],
                       peak_rss_bytes int|null}
    limits            null | {memory_bandwidth_gb_s float, bandwidth_method str, decoder_weight_bytes int,
                       tpot_limit_ms float, decoder {num_layers, hidden_size, intermediate_size,
                       num_heads, num_kv_heads, head_dim, vocab_size: int}}
    peer              null | with --compare llama.cpp: {runtime str, version str (llama-cpp-python),
                       gguf str, text str, text_type str, mmproj str, mtmd_lib str ("bundled" or the
                       fixed build's folder), workarounds [str], threads int, n_batch int, n_ubatch int,
                       kv_type str, flash_attn str, vision_flash_attn str (libmtmd's), weight_bytes int
                       (its text model's tensors),
                       tpot_limit_ms float|null, prompt_tokens int, peak_rss_bytes int|null (the child
                       process's), system_info str, parity {image_embd_max_abs_diff float|null,
                       image_embd_max_abs float (ours, for scale),
                       tokens_equal int|null, decoder_tokens_equal int|null (greedy tokens equal to
                       ours unpruned: llama.cpp's whole path; its decoder fed our embeddings), new_tokens int}}
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from pathlib import Path

from ..errors import InputError, TopsError

STAT = {"median": float, "p90": float}
NUM = (int, float)
OPT = type(None)

RATIOS = {"vision": (STAT, OPT), "prefill": (STAT, OPT), "ttft": (STAT, OPT), "tpot": (STAT, OPT), "e2e": (STAT, OPT)}
BUDGET_LIMITS = {"prefill_flops": int, "prefill_flops_dense": int, "unpruned_prefill_flops": int, "flop_ratio": (NUM, OPT),
                 "prefill_ratio": (NUM, OPT), "prefill_vs_limit": (NUM, OPT), "prefill_gflop_s": (NUM, OPT),
                 "tpot_limit_ms": NUM,
                 "tpot_vs_limit": (NUM, OPT)}
BUDGET_PEER = {"preprocess_ms": STAT, "vision_ms": STAT, "prefill_ms": STAT, "ttft_ms": STAT, "tpot_ms": (STAT, OPT),
               "e2e_ms": STAT, "generated_tokens": [int], "prompt_tokens": int, "ratios": RATIOS,
               "prefill_gflop_s": (NUM, OPT), "tpot_vs_limit": (NUM, OPT)}
LIMITS = {"memory_bandwidth_gb_s": NUM, "bandwidth_method": str, "decoder_weight_bytes": int, "tpot_limit_ms": NUM,
          "decoder": {k: int for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                                       "head_dim", "vocab_size")}}
PEER = {"runtime": str, "version": str, "gguf": str, "text": str, "text_type": str, "mmproj": str, "mtmd_lib": str,
        "workarounds": [str], "threads": int, "n_batch": int, "n_ubatch": int, "kv_type": str, "flash_attn": str,
        "vision_flash_attn": str, "weight_bytes": int, "tpot_limit_ms": (NUM, OPT), "prompt_tokens": int, "peak_rss_bytes": (int, OPT),
        "system_info": str, "parity": {"image_embd_max_abs_diff": (NUM, OPT), "image_embd_max_abs": NUM, "tokens_equal": (int, OPT),
                                       "decoder_tokens_equal": (int, OPT), "new_tokens": int}}

SCHEMA = {
    "schema": str,
    "created_utc": str,
    "directory": str,
    "settings": {"keeps": [int], "runs": int, "warmup": int, "prompt_len": int, "prompt_text_tokens": int,
                 "new_tokens": int, "image": str, "compare": (str, OPT), "budget": str, "selectors": [str],
                 "cuts": [int], "gguf": (str, OPT)},
    "device": {"cpu": str, "logical_cores": int, "platform": str, "ort_intra_op_threads": int,
               "ort_providers": [str], "ort_available_providers": [str], "gpu": (str, OPT),
               "jetson_power_mode": (str, OPT), "versions": dict, "model_source": str, "selector": str,
               "positions": str, "num_visual_tokens": int, "num_visual_tokens_total": int, "rss_method": str},
    "budgets": [{"keep": int, "selector": str, "stages": [{"layer": int, "keep": int}], "prompt_tokens": int,
                 "segment_prefill_ms": [STAT], "segment_kv_bytes": [int], "preprocess_ms": STAT, "vision_ms": STAT, "select_ms": STAT,
                 "prefill_ms": STAT, "ttft_ms": STAT, "tpot_ms": (STAT, OPT), "decode_tok_s": (NUM, OPT),
                 "e2e_ms": STAT, "sessions_ms": STAT, "overhead_pct": STAT, "generated_tokens": [int], "finish_reasons": [str], "kv_cache_bytes": int,
                 "peak_rss_bytes": (int, OPT), "gpu_peak_bytes": (int, OPT), "hf_e2e_ratio": (NUM, OPT),
                 "select_share_pct": STAT, "limits": (BUDGET_LIMITS, OPT), "peer": (BUDGET_PEER, OPT)}],
    "hf": ({"model_source": str, "config_matches_export": (bool, OPT), "attn_implementation": str,
            "torch_threads": int, "e2e_ms": STAT, "generated_tokens": [int], "peak_rss_bytes": (int, OPT)}, OPT),
    "limits": (LIMITS, OPT),
    "peer": (PEER, OPT),
}

CSV_COLUMNS = [
    "keep", "selector", "stages", "prompt_tokens", "kv_cache_bytes", "segment_prefill_ms_median", "segment_kv_bytes",
    *[f"{s}_ms_{q}" for s in ("preprocess", "vision", "select", "prefill", "ttft", "tpot", "e2e") for q in ("median", "p90")],
    "sessions_ms_median", "overhead_pct_median", "decode_tok_s", "generated_tokens_mean", "peak_rss_bytes", "gpu_peak_bytes", "hf_e2e_ratio",
    "select_share_pct_median", "flop_ratio", "prefill_ratio", "tpot_limit_ms", "tpot_vs_limit",
    *[f"peer_{s}_ms_median" for s in ("vision", "prefill", "ttft", "tpot", "e2e")],
    *[f"{s}_ratio_median" for s in ("vision", "prefill", "ttft", "tpot", "e2e")],
]


def validate(obj, schema=SCHEMA, where: str = "report") -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type (int counts as a
    float where a float is expected; bool never counts as a number)."""
    if isinstance(schema, tuple):  # alternatives
        errors = []
        for alt in schema:
            try:
                return validate(obj, alt, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(" / ".join(errors))
    if isinstance(schema, dict):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object, got {type(obj).__name__}")
        for key, sub in schema.items():
            if key not in obj:
                raise ValueError(f"{where}: missing key '{key}'")
            validate(obj[key], sub, f"{where}.{key}")
        return
    if isinstance(schema, list):
        if not isinstance(obj, list):
            raise ValueError(f"{where}: expected a list, got {type(obj).__name__}")
        for i, item in enumerate(obj):
            validate(item, schema[0], f"{where}[{i}]")
        return
    ok = isinstance(obj, schema) and not (isinstance(obj, bool) and schema in (int, float))
    if schema is float:
        ok = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    if not ok:
        raise ValueError(f"{where}: expected {schema.__name__}, got {type(obj).__name__} ({obj!r})")


def csv_rows(report) -> list[dict]:
    rows = []
    for b in report["budgets"]:
        row = {"keep": b["keep"], "selector": b["selector"], "stages": _stages(b["stages"]),
               "prompt_tokens": b["prompt_tokens"], "kv_cache_bytes": b["kv_cache_bytes"],
               "segment_prefill_ms_median": " ".join(str(st["median"]) for st in b["segment_prefill_ms"]),
               "segment_kv_bytes": " ".join(map(str, b["segment_kv_bytes"]))}
        for s in ("preprocess", "vision", "select", "prefill", "ttft", "tpot", "e2e"):
            stat = b[f"{s}_ms"] or {}
            for q in ("median", "p90"):
                row[f"{s}_ms_{q}"] = stat.get(q, "")
        row["sessions_ms_median"] = b["sessions_ms"]["median"]
        row["overhead_pct_median"] = b["overhead_pct"]["median"]
        row["decode_tok_s"] = "" if b["decode_tok_s"] is None else b["decode_tok_s"]
        row["generated_tokens_mean"] = round(sum(b["generated_tokens"]) / len(b["generated_tokens"]), 2)
        for key in ("peak_rss_bytes", "gpu_peak_bytes", "hf_e2e_ratio"):
            row[key] = "" if b[key] is None else b[key]
        row["select_share_pct_median"] = b["select_share_pct"]["median"]
        limits, peer = b.get("limits") or {}, b.get("peer") or {}
        for key in ("flop_ratio", "prefill_ratio", "tpot_limit_ms", "tpot_vs_limit"):
            row[key] = "" if limits.get(key) is None else limits[key]
        for s in ("vision", "prefill", "ttft", "tpot", "e2e"):
            row[f"peer_{s}_ms_median"] = (peer.get(f"{s}_ms") or {}).get("median", "")
            row[f"{s}_ratio_median"] = ((peer.get("ratios") or {}).get(s) or {}).get("median", "")
        rows.append(row)
    return rows


def csv_text(report) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(report))
    return buf.getvalue()


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _ms(stat) -> str:
    return "-" if not stat else f"{stat['median']:.1f}/{stat['p90']:.1f}"


def _ratio(stat) -> str:
    return "-" if not stat else f"{stat['median']:.2f}/{stat['p90']:.2f}"


def _stages(stages) -> str:
    return " ".join(f"L{st['layer']}:{st['keep']}" for st in stages) or "-"


def format_table(report) -> str:
    """The terminal table: medians/p90 in ms, sizes in MiB."""
    d, s = report["device"], report["settings"]
    head = ["keep", "selector", "stages", "prompt", "TTFT", "vision", "select", "prefill", "per segment", "TPOT",
            "tok/s", "e2e", "ovh %", "KV MiB", "RSS MiB"]
    hf = report.get("hf")
    if hf:
        head.append("e2e/HF")
    rows = []
    for b in report["budgets"]:
        row = [str(b["keep"]), b["selector"], _stages(b["stages"]), str(b["prompt_tokens"]), _ms(b["ttft_ms"]),
               _ms(b["vision_ms"]), _ms(b["select_ms"]), _ms(b["prefill_ms"]),
               "+".join(f"{st['median']:.1f}" for st in b["segment_prefill_ms"]), _ms(b["tpot_ms"]), "-" if b["decode_tok_s"] is None else f"{b['decode_tok_s']:.1f}",
               _ms(b["e2e_ms"]), f"{b['overhead_pct']['median']:.1f}", _mib(b["kv_cache_bytes"]), _mib(b["peak_rss_bytes"])]
        if hf:
            row.append("-" if b["hf_e2e_ratio"] is None else f"{b['hf_e2e_ratio']:.2f}")
        rows.append(row)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    out = [
        f"{report['directory']}: {d['model_source']}, selector {d['selector']}, N = {d['num_visual_tokens']}; "
        f"{s['runs']} runs after {s['warmup']} warmup, prompt ~{s['prompt_text_tokens']} text tokens, "
        f"{s['new_tokens']} new tokens",
        f"{d['cpu']}, {d['logical_cores']} logical cores, ORT threads {d['ort_intra_op_threads'] or 'default'}, "
        f"{', '.join(d['ort_providers'])}" + (f", GPU {d['gpu']}" if d["gpu"] else "")
        + (f", {d['jetson_power_mode']}" if d["jetson_power_mode"] else ""),
        "times: median/p90 ms; TTFT = preprocess+vision+select+prefill; e2e = whole generate() call; "
        "ovh % = e2e outside preprocessing and the backend's run calls, in % of the latter; "
        "keep = T, the visual tokens kept on average over the decoder's layers; stages = layer:tokens kept "
        "(L0 = before the LLM); per segment = each decoder segment's prefill step (median ms)"
        + (f"; decoder cut at {','.join(map(str, s['cuts']))}" if s["cuts"] else ""),
        line(head),
        *(line(r) for r in rows),
    ]
    if hf:
        out.append(f"HF generate ({hf['attn_implementation']}, unpruned, {hf['torch_threads']} torch threads): "
                   f"e2e {_ms(hf['e2e_ms'])} ms, tokens {hf['generated_tokens']}")
    out.extend(_limits_table(report))
    out.extend(_peer_table(report))
    short = [b["keep"] for b in report["budgets"] if min(b["generated_tokens"]) < s["new_tokens"]]
    if short:
        out.append(f"note: EOS ended some runs early at keep {short}; tok/s uses the real counts")
    out.append(f"peak RSS: {d['rss_method']}")
    return "\n".join(out)


def _grid(head, rows) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(head), *(line(r) for r in rows)]


def _num(x, fmt="{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _limits_table(report) -> list[str]:
    lim = report.get("limits")
    if not lim:
        return []
    head = ["keep", "selector", "prefill ratio", "FLOP limit", "x limit", "GFLOP/s", "TPOT", "TPOT limit", "x limit",
            "select % TTFT"]
    rows = []
    for b in report["budgets"]:
        bl = b.get("limits") or {}
        rows.append([str(b["keep"]), b["selector"], _num(bl.get("prefill_ratio")), _num(bl.get("flop_ratio")),
                     _num(bl.get("prefill_vs_limit"), "{:.2f}"), _num(bl.get("prefill_gflop_s"), "{:.1f}"), _ms(b["tpot_ms"]), _num(bl.get("tpot_limit_ms"), "{:.2f}"),
                     _num(bl.get("tpot_vs_limit"), "{:.2f}"), _ms(b["select_share_pct"])])
    return [
        f"limits: memory bandwidth {lim['memory_bandwidth_gb_s']:.1f} GB/s ({lim['bandwidth_method']}); decoder weights "
        f"{lim['decoder_weight_bytes'] / 1e6:.1f} MB -> TPOT limit {lim['tpot_limit_ms']:.2f} ms (every weight read once "
        "per token); prefill ratio = this budget's prefill / the unpruned one's, FLOP limit = the same ratio of "
        "prefill FLOPs (sum over segments of layers x tokens, causal attention's quadratic term); x limit = measured / "
        "limit; GFLOP/s = prefill FLOPs / median prefill; select % TTFT = median/p90 %",
        *_grid(head, rows),
    ]


def _peer_table(report) -> list[str]:
    peer = report.get("peer")
    if not peer:
        return []
    head = ["keep", "selector", "TTFT", "vision", "prefill", "GFLOP/s", "TPOT", "x limit", "e2e",
            "TTFT x", "vision x", "prefill x", "TPOT x", "e2e x"]
    rows = []
    for b in report["budgets"]:
        bp = b.get("peer")
        if not bp:
            continue
        r = bp["ratios"]
        rows.append([str(b["keep"]), b["selector"], _ms(bp["ttft_ms"]), _ms(bp["vision_ms"]), _ms(bp["prefill_ms"]),
                     _num(bp.get("prefill_gflop_s"), "{:.1f}"), _ms(bp["tpot_ms"]), _num(bp.get("tpot_vs_limit"), "{:.2f}"),
                     _ms(bp["e2e_ms"]),
                     *[_ratio(r[k]) for k in ("ttft", "vision", "prefill", "tpot", "e2e")]])
    par = peer["parity"]
    diff = par["image_embd_max_abs_diff"]
    return [
        f"llama.cpp (llama-cpp-python {peer['version']}; text {peer['text_type']}, mmproj {peer['mmproj']}, libmtmd "
        f"{peer['mtmd_lib']}; KV {peer['kv_type']}, flash-attn {peer['flash_attn']} (vision {peer['vision_flash_attn']}), n_batch {peer['n_batch']}, "
        f"n_ubatch {peer['n_ubatch']}, threads {peer['threads']}), unpruned, prompt {peer['prompt_tokens']} tokens, "
        f"run alternately with each budget's runs; x = ours / llama.cpp per pair of runs (median/p90; below 1: ours "
        f"faster); TPOT limit {_num(peer['tpot_limit_ms'], '{:.2f}')} ms ({peer['weight_bytes'] / 1e6:.1f} MB)",
        *_grid(head, rows),
        f"parity: image embeddings max |llama.cpp - ours| {_num(diff, '{:.2e}')} (max |ours| {par['image_embd_max_abs']:.3g}); "
        "greedy tokens equal to ours unpruned "
        f"{par['tokens_equal'] if par['tokens_equal'] is not None else '-'}/{par['new_tokens']} (llama.cpp's whole path), "
        f"{par['decoder_tokens_equal'] if par['decoder_tokens_equal'] is not None else '-'}/{par['new_tokens']} "
        "(its decoder on our embeddings)",
    ]


# --- output files ----------------------------------------------------------------------------
def check_writable(path) -> Path:
    """Fail before the benchmark runs if `path` cannot be written (missing or read-only folder)."""
    path = Path(path)
    parent = path.parent
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise InputError(f"cannot write {path}: folder {parent} does not exist")
    try:  # a real probe: os.access says yes to root even where a write fails (read-only mounts, /proc)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write {path}: folder {parent} is not writable ({exc.strerror or exc})") from None
    return path


def write_atomic(path, data: bytes | str) -> Path:
    """Write to a temporary file beside `path`, then rename it over `path`."""
    path = check_writable(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(report, path) -> Path:
    return write_atomic(path, json.dumps(report, indent=2) + "\n")


def write_csv(report, path) -> Path:
    return write_atomic(path, csv_text(report))


def short_label(source) -> str:
    """A model or task for a plot title: a local path by its last component (a figure should not
    carry the machine's directory layout), a hub id or a built-in name as it is."""
    text = str(source)
    if os.path.isabs(text) or text.startswith(".") or os.path.exists(text):
        return Path(text).name or text
    return text


def require_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TopsError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    return plt


def write_plot(report, path) -> Path:
    """PNG: TTFT (median, p90 band) and KV-cache bytes against kept visual tokens."""
    plt = require_matplotlib()
    budgets = sorted(report["budgets"], key=lambda b: b["keep"])
    keeps = [b["keep"] for b in budgets]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(keeps, [b["ttft_ms"]["median"] for b in budgets], "o-", label="median")
    ax1.fill_between(keeps, [b["ttft_ms"]["median"] for b in budgets], [b["ttft_ms"]["p90"] for b in budgets],
                     alpha=0.3, label="to p90")
    ax1.set(xlabel="kept visual tokens", ylabel="TTFT (ms)", title="time to first token")
    ax1.legend()
    ax2.plot(keeps, [b["kv_cache_bytes"] / 2**20 for b in budgets], "s-")
    ax2.set(xlabel="kept visual tokens", ylabel="KV cache (MiB)", title="KV cache at the end")
    fig.suptitle(f"{short_label(report['device']['model_source'])} ({report['device']['selector']}), {report['device']['cpu']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())
