"""Peak host RAM of exporting the LLaVA-1.5-7B decoder to ONNX, extrapolated from a few layers.

A full 7B decoder in fp32 (~26 GB of weights) does not fit a small machine, so this builds LLaVA
models with the real Llama-2-7B layer shapes (hidden 4096, MLP 11008, 32 heads, 32 KV heads, vocab
32064, 4096 positions) but only L decoder layers, random weights (HF's own init, seed 0) and a tiny
vision tower, exports the `decoder` part with `tops_edge.export.onnx_export.export_part` (legacy
exporter, opset 18), and measures the peak RSS of each export in a fresh process. A least-squares
line peak(L) = a + b*L over the measured L gives the 32-layer estimate.

Each export is then loaded by ONNX Runtime (CPU) in another fresh process, which runs one decode
step (S=1, past length 4) and checks the logits are finite and match torch on the same inputs.

torch's legacy exporter keeps the weights inside the protobuf while the graph is under 2 GB (L<=2 with
these shapes) and writes external data above it (L>=3, and the real 32 layers); the two paths use
memory differently, so the fit uses only the L>=3 points when at least two were measured.

  cd /work/main && PYTHONPATH=. python scripts/export_memory.py [--layers 3,4,6] [--out DIR] [--json FILE]

Memory: L layers take about 0.81*L + 1.05 GB of weights (embedding + lm_head are 0.5 GB each), and
the export holds a few copies of them; disk needs about 2x that in --out while a part is exported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1 << 30
TARGET_LAYERS = 32
#: Llama-2-7B as in llava-hf/llava-1.5-7b-hf, except num_hidden_layers
TEXT_7B = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, initializer_range=0.02,
)
DECODE_PAST, DECODE_SEQ = 4, 1


# ---------------------------------------------------------------------------------------------
# helpers shared by the child processes
# ---------------------------------------------------------------------------------------------
def proc_status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RssSampler:
    """Samples VmRSS every `interval` s in a thread and keeps the maximum per named phase."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        rss = proc_status_kib("VmRSS")
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)

    def set_phase(self, name: str):
        self.sample()
        self.phase = name
        self.sample()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def decode_feeds(num_layers: int, heads: int, head_dim: int, hidden: int) -> dict[str, np.ndarray]:
    """One decode step: S=1 new token after a past of DECODE_PAST, fixed random values."""
    rng = np.random.default_rng(123)
    feeds = {
        "inputs_embeds": rng.standard_normal((1, DECODE_SEQ, hidden), dtype=np.float32) * 0.02,
        "attention_mask": np.ones((1, DECODE_PAST + DECODE_SEQ), np.int64),
        "attention_bias": np.zeros((1, DECODE_PAST + DECODE_SEQ), np.float32),
        "position_ids": np.arange(DECODE_PAST, DECODE_PAST + DECODE_SEQ, dtype=np.int64)[None],
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = rng.standard_normal((1, heads, DECODE_PAST, head_dim), dtype=np.float32)
    return feeds


# ---------------------------------------------------------------------------------------------
# child 1: build + export, measuring RSS
# ---------------------------------------------------------------------------------------------
def child_export(layers: int, out_dir: Path, result_file: Path, opset: int) -> None:
    import torch

    import tops_edge.export.onnx_export as onnx_export
    from tops_edge.models.llava import LlavaAdapter
    from tops_edge.models.tiny import build_tiny_llava

    res: dict = {"layers": layers, "torch_threads": torch.get_num_threads()}
    with RssSampler() as sampler:
        res["rss_at_start_kib"] = proc_status_kib("VmRSS")
        sampler.set_phase("build")
        t0 = time.perf_counter()
        text = dict(TEXT_7B, num_hidden_layers=layers)
        model, processor = build_tiny_llava(seed=0, text=text)
        res["build_s"] = time.perf_counter() - t0
        res["rss_after_build_kib"] = proc_status_kib("VmRSS")
        res["hwm_after_build_kib"] = proc_status_kib("VmHWM")

        adapter = LlavaAdapter(model, processor, source="7b-shape")
        part = next(p for p in adapter.parts() if p.name == "decoder")
        params = {id(p): p for p in model.parameters()}
        res["model_param_bytes"] = sum(p.numel() * p.element_size() for p in params.values())
        dec = {id(p): p for p in part.module.parameters()}
        res["decoder_param_bytes"] = sum(p.numel() * p.element_size() for p in dec.values())
        emb = part.module.language_model.get_input_embeddings().weight
        # the decoder graph takes inputs_embeds, so the token embedding is not one of its weights
        res["decoder_graph_param_bytes"] = res["decoder_param_bytes"] - emb.numel() * emb.element_size()
        # a sum is finite iff every element is (the values are ~0.02), and it needs no full-size temporary
        finite = all(bool(torch.isfinite(p.sum())) for p in dec.values())
        res["weights_finite"] = finite
        if not finite:
            raise SystemExit("non-finite weights after init")

        # mark the two halves of export_part: torch.onnx.export, then onnx load + re-save + check
        real_save_graph = onnx_export.save_graph

        def save_graph(src, dst):
            res["torch_onnx_export_s"] = time.perf_counter() - t1
            res["hwm_after_torch_export_kib"] = proc_status_kib("VmHWM")
            raw = Path(src).parent
            res["raw_export_files"] = len(list(raw.iterdir()))
            res["raw_export_bytes"] = sum(f.stat().st_size for f in raw.iterdir())
            sampler.set_phase("save_graph")
            return real_save_graph(src, dst)

        onnx_export.save_graph = save_graph
        sampler.set_phase("torch.onnx.export")
        t1 = time.perf_counter()
        try:
            files = onnx_export.export_part(part, out_dir / "decoder.onnx", opset=opset, exporter="legacy")
        finally:
            onnx_export.save_graph = real_save_graph
        res["export_s"] = time.perf_counter() - t1
        sampler.set_phase("after")
        res["hwm_after_export_kib"] = proc_status_kib("VmHWM")
        res["files"] = {f: (out_dir / f).stat().st_size for f in files}
        res["leftovers"] = sorted(p.name for p in out_dir.iterdir() if p.name not in files and p.name != "ref.npz")

    res["rss_phase_peaks_kib"] = dict(sampler.peaks)

    # torch reference for the ORT check (after all RSS readings, so it cannot move the peak)
    feeds = decode_feeds(layers, adapter.num_kv_heads, adapter.head_dim, adapter.hidden_size)
    with torch.no_grad():
        out = part.module(*[torch.from_numpy(feeds[s.name]) for s in part.inputs])
    np.savez(out_dir / "ref.npz", logits=out[0].numpy(), present_last=out[-1].numpy())
    result_file.write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# child 2: ORT load + one decode step
# ---------------------------------------------------------------------------------------------
def child_ort(layers: int, out_dir: Path, result_file: Path) -> None:
    import onnxruntime as ort

    res: dict = {"layers": layers, "ort_version": ort.__version__}
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(out_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_kib"] = proc_status_kib("VmRSS")
    inputs = {i.name: i for i in sess.get_inputs()}
    k = inputs["past_key_values.0.key"].shape
    heads, head_dim = int(k[1]), int(k[3])
    hidden = int(inputs["inputs_embeds"].shape[2])
    feeds = decode_feeds(layers, heads, head_dim, hidden)
    t1 = time.perf_counter()
    outs = sess.run(None, feeds)
    res["run_s"] = time.perf_counter() - t1
    logits, present_last = outs[0], outs[-1]
    ref = np.load(out_dir / "ref.npz")
    res["logits_shape"] = list(logits.shape)
    res["present_shape"] = list(present_last.shape)
    res["logits_finite"] = bool(np.isfinite(logits).all())
    res["max_abs_diff_logits"] = float(np.abs(logits - ref["logits"]).max())
    res["max_abs_logit"] = float(np.abs(ref["logits"]).max())
    res["max_abs_diff_present"] = float(np.abs(present_last - ref["present_last"]).max())
    res["argmax_match"] = bool((logits.argmax(-1) == ref["logits"].argmax(-1)).all())
    res["hwm_kib"] = proc_status_kib("VmHWM")
    result_file.write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# parent
# ---------------------------------------------------------------------------------------------
def run_child(args: list[str], result_file: Path, log_file: Path) -> tuple[dict, int, float]:
    """Runs this script as a child; returns (its result JSON, its peak RSS in KiB from wait4, wall s)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args, "--_result", str(result_file)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the max over all children
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log_file.read_text()[-3000:]
        raise RuntimeError(f"child {' '.join(args)} exited with {proc.returncode}:\n{tail}")
    return json.loads(result_file.read_text()), usage.ru_maxrss, wall  # ru_maxrss is KiB on Linux


def fit_line(xs, ys) -> tuple[float, float, float]:
    """Least squares y = a + b*x; returns (a, b, max |residual|)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    if len(set(xs)) < 2:
        raise SystemExit("need at least two distinct --layers values to fit a line")
    b, a = np.polyfit(x, y, 1)
    return float(a), float(b), float(np.abs(a + b * x - y).max())


def analytic_decoder_bytes(layers: int) -> int:
    """fp32 bytes of the decoder graph's weights (no token embedding) for the 7B shapes."""
    h, m, v = TEXT_7B["hidden_size"], TEXT_7B["intermediate_size"], TEXT_7B["vocab_size"]
    per_layer = 4 * h * h + 3 * h * m + 2 * h
    return 4 * (layers * per_layer + h + v * h)


def gib(kib_or_bytes: float, kib: bool = True) -> float:
    return kib_or_bytes * (1024 if kib else 1) / GiB


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description="Measure peak host RAM of exporting the LLaVA-1.5-7B decoder (7B layer shapes, "
                    "fewer layers, random weights) to ONNX and extrapolate to 32 layers.")
    ap.add_argument("--layers", default="3,4,6",
                    help="comma-separated layer counts to measure (default 3,4,6: peak ~12 GiB RAM, ~6 min). The "
                         "fit uses only the L whose torch export took the >2 GB external-data path (L>=3 here), as "
                         "the 32-layer export does, when at least two such L were measured; L=1,2 are still shown. "
                         "E.g. --layers 1,2,3,4,6,8 (L=8 needs ~15 GiB RAM)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for the exports (one subfolder per L, kept); default a temp folder, removed")
    ap.add_argument("--json", type=Path, default=None, help="write all measurements to this JSON file")
    ap.add_argument("--opset", type=int, default=18)
    ap.add_argument("--skip-ort", action="store_true", help="do not load the exports in ONNX Runtime")
    ap.add_argument("--_child", choices=["export", "ort"], help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    layer_list = [int(s) for s in args.layers.split(",") if s.strip()]
    if args._child:
        out_dir = args.out
        if args._child == "export":
            child_export(layer_list[0], out_dir, args._result, args.opset)
        else:
            child_ort(layer_list[0], out_dir, args._result)
        return 0

    if not layer_list or min(layer_list) < 1:
        ap.error("--layers needs positive integers")
    temp = args.out is None
    root = Path(tempfile.mkdtemp(prefix="export-memory-")) if temp else args.out.resolve()
    root.mkdir(parents=True, exist_ok=True)
    import onnxruntime
    import torch
    import transformers

    report: dict = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__, "python": sys.version.split()[0]},
        "cpus": os.cpu_count(),
        "mem_total_kib": int(open("/proc/meminfo").readline().split()[1]),
        "text_config": TEXT_7B, "opset": args.opset, "exporter": "legacy", "runs": [],
    }
    t_all = time.perf_counter()
    try:
        for L in layer_list:
            d = root / f"L{L}"
            if d.exists():
                shutil.rmtree(d)  # onnx appends to an existing .onnx.data: always export into a fresh folder
            d.mkdir(parents=True)
            print(f"[L={L}] build + export ...", flush=True)
            exp, peak_kib, wall = run_child(["--_child", "export", "--layers", str(L), "--out", str(d),
                                             "--opset", str(args.opset)], d / "export.json", d / "export.log")
            run = {"layers": L, "export": exp, "export_peak_rss_kib": peak_kib, "export_wall_s": wall}
            print(f"[L={L}] peak RSS {gib(peak_kib):.2f} GiB, weights {gib(exp['decoder_graph_param_bytes'], False):.2f} GiB, "
                  f"files {exp['files']}, {wall:.0f} s", flush=True)
            if not args.skip_ort:
                ortr, ort_peak, ort_wall = run_child(["--_child", "ort", "--layers", str(L), "--out", str(d)],
                                                     d / "ort.json", d / "ort.log")
                run.update(ort=ortr, ort_peak_rss_kib=ort_peak, ort_wall_s=ort_wall)
                print(f"[L={L}] ORT: finite={ortr['logits_finite']} max|diff| logits {ortr['max_abs_diff_logits']:.2e} "
                      f"peak RSS {gib(ort_peak):.2f} GiB, {ort_wall:.0f} s", flush=True)
            report["runs"].append(run)
            if temp:
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
    report["total_s"] = time.perf_counter() - t_all

    runs = report["runs"]
    w32 = analytic_decoder_bytes(TARGET_LAYERS)
    for r in runs:
        # torch's legacy exporter keeps the weights inside the protobuf below 2 GB and writes one file per
        # tensor above it; the two paths use memory differently, and the 32-layer export takes the second
        r["torch_external_data"] = r["export"]["raw_export_files"] > 1
        # the measured graph weights must equal the analytic count, or the extrapolation is off
        r["analytic_decoder_graph_bytes"] = analytic_decoder_bytes(r["layers"])
    big = [r for r in runs if r["torch_external_data"]]
    fit_runs = big if len({r["layers"] for r in big}) >= 2 else runs
    report["fit_layers"] = [r["layers"] for r in fit_runs]
    xs = [r["layers"] for r in fit_runs]
    can_fit = len(set(xs)) >= 2
    if can_fit:
        peak_a, peak_b, peak_res = fit_line(xs, [gib(r["export_peak_rss_kib"]) for r in fit_runs])
        all_a, all_b, all_res = fit_line([r["layers"] for r in runs], [gib(r["export_peak_rss_kib"]) for r in runs])
        ort_runs = [r for r in fit_runs if "ort" in r]
        ort_fit = fit_line([r["layers"] for r in ort_runs], [gib(r["ort_peak_rss_kib"]) for r in ort_runs]) \
            if len({r["layers"] for r in ort_runs}) >= 2 else None

    lines = [
        "| L | decoder weights (GiB) | model params (GiB) | .onnx + .onnx.data (GiB) | build s | export s "
        "| RSS after build (GiB) | peak RSS export (GiB) | peak / weights | torch wrote ext. data | ORT load+run peak (GiB) "
        "| ORT decode ok |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        e = r["export"]
        w = e["decoder_graph_param_bytes"]
        files = " + ".join(f"{gib(s, False):.3f}" for s in e["files"].values())
        ort_cell = ort_peak_cell = "skipped"
        if "ort" in r:
            o = r["ort"]
            ort_cell = f"{'yes' if o['logits_finite'] else 'NO'} (max diff {o['max_abs_diff_logits']:.1e})"
            ort_peak_cell = f"{gib(r['ort_peak_rss_kib']):.2f}"
        lines.append(
            f"| {r['layers']} | {gib(w, False):.3f} | {gib(e['model_param_bytes'], False):.3f} | {files} "
            f"| {e['build_s']:.0f} | {e['export_s']:.0f} | {gib(e['rss_after_build_kib']):.2f} "
            f"| {gib(r['export_peak_rss_kib']):.2f} | {r['export_peak_rss_kib'] * 1024 / w:.2f} "
            f"| {'yes' if r['torch_external_data'] else 'no (in-proto)'} | {ort_peak_cell} | {ort_cell} |"
        )
    print()
    print("\n".join(lines))
    print()
    print("Peak RSS by phase (GiB, sampled every 50 ms): "
          + "; ".join(f"L={r['layers']}: " + ", ".join(f"{k} {gib(v):.2f}" for k, v in r["export"]["rss_phase_peaks_kib"].items()
                                                      if k not in ("start",)) for r in runs))
    if can_fit:
        p32 = peak_a + peak_b * TARGET_LAYERS
        report["fit"] = {"layers": xs, "a_gib": peak_a, "b_gib_per_layer": peak_b, "max_residual_gib": peak_res,
                         "peak_32_gib": p32, "decoder_weights_32_bytes": w32,
                         "ratio_to_weights": p32 * GiB / w32,
                         "all_points": {"a_gib": all_a, "b_gib_per_layer": all_b, "max_residual_gib": all_res,
                                        "peak_32_gib": all_a + all_b * TARGET_LAYERS}}
        print(f"\nFit over L={xs}: peak_RSS(L) = {peak_a:.3f} + {peak_b:.3f} * L GiB (max residual {peak_res:.3f} GiB)")
        print(f"Extrapolated {TARGET_LAYERS}-layer (LLaVA-1.5-7B decoder) export peak: {p32:.1f} GiB "
              f"= {p32 * GiB / w32:.2f} x the decoder's fp32 weights ({gib(w32, False):.2f} GiB, {w32 / 1e9:.2f} GB)")
        if len(fit_runs) < len(runs):
            print(f"(a fit over all L={[r['layers'] for r in runs]} would say {all_a:.3f} + {all_b:.3f} * L -> "
                  f"{all_a + all_b * TARGET_LAYERS:.1f} GiB, max residual {all_res:.3f} GiB; it mixes in the "
                  f"in-proto export path that a 32-layer export does not take)")
        elif len(big) < 2:
            print("WARNING: fewer than two measured L took the >2 GB path the 32-layer export takes; "
                  "add e.g. --layers 3,4 for a fit that matches it")
        if ort_fit:
            oa, ob, ores = ort_fit
            report["ort_fit"] = {"a_gib": oa, "b_gib_per_layer": ob, "max_residual_gib": ores,
                                 "peak_32_gib": oa + ob * TARGET_LAYERS}
            print(f"ORT load + one decode step: peak_RSS(L) = {oa:.3f} + {ob:.3f} * L GiB -> "
                  f"{oa + ob * TARGET_LAYERS:.1f} GiB at {TARGET_LAYERS} layers")
    else:
        print("\n(one layer count only: no extrapolation)")
    print(f"Total time {report['total_s']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")
    bad = [r["layers"] for r in runs if "ort" in r and not r["ort"]["logits_finite"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
