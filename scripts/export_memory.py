"""Peak host RAM of exporting LLaVA-1.5-7B to ONNX, extrapolated from a few decoder layers.

A full 7B model in fp32 (~26 GiB of weights) does not fit a small machine, so this builds LLaVA
models with the real Llama-2-7B layer shapes (hidden 4096, MLP 11008, 32 heads, 32 KV heads, vocab
32064, 4096 positions) but only L decoder layers, random weights (HF's own init, seed 0) and a tiny
vision tower (`tops_edge.models.tiny.build_tiny_llava`), measures the peak RSS of exporting them in
fresh processes, and fits peak(L) = a + b*L by least squares to estimate the 32-layer figure.

Two modes:

* decoder only (default): exports only the `decoder` part with `tops_edge.export.onnx_export.export_part`
  (legacy exporter, opset 18); the peak is the child's ru_maxrss. Each export is then loaded by ONNX
  Runtime (CPU) in another fresh process, which runs one decode step in the decoder's fixed-size
  cache (C=8 slots, 4 filled, S=1 new token at cache_position 4; inputs checked against the graph's)
  and compares the logits and two layers' `present` rows with torch on the same inputs.

* full export (`--precisions fp32,fp16,int8-wo,int4-wo-rtn[,int4-wo]`): per L, one child builds the
  model, saves it with save_pretrained (model + processor) into a folder under --out (default a temp
  folder in /tmp) and checks `tops_edge.models.load` reads it back with the same weights; then per
  precision a fresh child runs `tops_edge.export.export_model(DIR, OUT, precision=P, progress=False)`
  (what `tops-export DIR` does: vision, embed and decoder parts, preprocessing, manifest, then the
  precision passes; int4-wo-rtn is int4-wo with int4_method="rtn", int4-wo is AWQ, which first runs 16
  fp32 calibration prefills through ONNX Runtime: slow). The child wraps export_part, write_manifest,
  tops_edge.calib.convert_parts and the passes' functions to name phases (load, export:<part>,
  preprocessing+manifest, passes:<part>:convert / :save, passes:capture) and reads and resets VmHWM
  (/proc/self/clear_refs) at each switch, so each phase's peak is exact; an RSS sampler thread (50 ms)
  also records RSS and RssAnon per phase. Reported per precision and L: the peak up to the passes, the
  peak during the passes and the whole peak, the model's fp32 parameter bytes, the export's file
  bytes, and whether torch Parameters are still alive when the passes start; per precision, lines
  over L for each peak, their 32-layer values and the ratio of the whole peak to the fp32 weights
  of the model at 32 layers (this model's, with its tiny vision tower, and the real 7.06e9-parameter
  LLaVA-1.5-7B's 26.3 GiB; the real CLIP ViT-L tower, ~1.1 GiB more, is not in the measured model).
  Models and exports are deleted as soon as they are measured (an L=4 model is 4.3 GiB on disk, its
  fp32 export as much again); logs and per-child JSON stay in --out when given.

torch's legacy exporter keeps the weights inside the protobuf while the decoder graph is under 2 GB
(L<=2 with these shapes) and writes external data above it (L>=3, and the real 32 layers); the two
paths use memory differently (L<=2 peak higher), so the fits use only the L>=3 points when at least
two were measured.

  cd /work/main && . .venv/bin/activate
  TOPS_EDGE_THREADS=1 OMP_NUM_THREADS=1 python scripts/export_memory.py --layers 3,4 [--out DIR] [--json FILE]
  TOPS_EDGE_THREADS=1 OMP_NUM_THREADS=1 python scripts/export_memory.py --layers 3,4 \\
      --precisions fp32,fp16,int8-wo,int4-wo-rtn --json /tmp/export_memory_precisions.json

Children inherit the environment: OMP_NUM_THREADS sets torch's threads, TOPS_EDGE_THREADS ONNX Runtime's.
Memory: L layers take about 0.754*L + 1.04 GiB of fp32 weights (embedding and lm_head 0.49 GiB each).
Measured (2 cores, torch 1 thread; --layers 3,4): decoder only 2.95 + 0.755 L GiB (27.1 GiB at 32 layers);
full export, whole peak: fp32 3.02 + 0.753 L (27.1), fp16 1.78 + 1.886 L (62.1), int8-wo 1.59 + 1.522 L
(50.3), int4-wo-rtn 3.25 + 1.699 L (57.6 GiB at 32); below the passes every precision peaks as fp32
does (in the decoder's torch export), the passes peak in the decoder's conversion. L=4 peaks at 10 GiB
(int4-wo-rtn), ~16 min for --layers 3,4 at the four precisions. The 50 ms samples miss up to 1.7 GiB of
the exact (HWM) phase peaks: torch.onnx.export and the passes hold the GIL for long stretches.
int4-wo (AWQ) fails at L=3 today: calib/int4.py activation_statistics serializes its probe copy of the
decoder in memory (SerializeToString, 2 GB protobuf limit) after the capture; the child records its
peaks up to the failure (13.1 GiB at L=3, in the capture + statistics phase).
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
DECODE_PAST, DECODE_SEQ, DECODE_CAPACITY = 4, 1, 8  # filled slots, new tokens, cache slots C


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


def compared_outputs(layers: int) -> tuple[str, ...]:
    """The decode step's outputs checked against torch: the logits and two layers' new cache rows."""
    return ("logits", "present.0.key", f"present.{layers - 1}.value")


def decode_feeds(num_layers: int, heads: int, head_dim: int, hidden: int) -> dict[str, np.ndarray]:
    """One decode step in the decoder's fixed-size cache (models/base.py DecoderSegment): S=1 new
    token at slot DECODE_PAST of a cache of DECODE_CAPACITY slots, the first DECODE_PAST filled.

    past_key_values.{i}.* are the [B, H, C, D] buffers (random where filled, zero in the free slots:
    they must be finite), attention_mask [B, C] marks the filled slots and this step's, cache_position
    [S] is this step's slot, attention_bias [B, C] is 0 (no merged tokens). Fixed random values."""
    rng = np.random.default_rng(123)
    slots = np.arange(DECODE_CAPACITY)
    feeds = {
        "inputs_embeds": rng.standard_normal((1, DECODE_SEQ, hidden), dtype=np.float32) * 0.02,
        "attention_mask": (slots < DECODE_PAST + DECODE_SEQ).astype(np.int64)[None],
        "position_ids": np.arange(DECODE_PAST, DECODE_PAST + DECODE_SEQ, dtype=np.int64)[None],
        "attention_bias": np.zeros((1, DECODE_CAPACITY), np.float32),
        "cache_position": np.arange(DECODE_PAST, DECODE_PAST + DECODE_SEQ, dtype=np.int64),
    }
    for i in range(num_layers):
        for kind in ("key", "value"):
            buf = np.zeros((1, heads, DECODE_CAPACITY, head_dim), np.float32)
            buf[:, :, :DECODE_PAST] = rng.standard_normal((1, heads, DECODE_PAST, head_dim), dtype=np.float32)
            feeds[f"past_key_values.{i}.{kind}"] = buf
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
    named = dict(zip([s.name for s in part.outputs], out))
    np.savez(out_dir / "ref.npz", **{k: v.numpy() for k, v in named.items() if k in compared_outputs(layers)})
    result_file.write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# child 2: ORT load + one decode step
# ---------------------------------------------------------------------------------------------
def child_ort(layers: int, out_dir: Path, result_file: Path) -> None:
    import onnxruntime as ort

    res: dict = {"layers": layers, "ort_version": ort.__version__}
    opts = ort.SessionOptions()
    threads = int(os.environ.get("TOPS_EDGE_THREADS", "0"))
    if threads:
        opts.intra_op_num_threads = threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(out_dir / "decoder.onnx"), opts, providers=["CPUExecutionProvider"])
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load_kib"] = proc_status_kib("VmRSS")
    inputs = {i.name: i for i in sess.get_inputs()}
    res["graph_inputs"] = {n: [d if isinstance(d, str) else int(d) for d in i.shape] for n, i in inputs.items()}
    k = inputs["past_key_values.0.key"].shape  # [B, H, C, D]
    heads, head_dim = int(k[1]), int(k[3])
    hidden = int(inputs["inputs_embeds"].shape[2])
    feeds = decode_feeds(layers, heads, head_dim, hidden)
    if set(feeds) != set(inputs):  # the graph's IO changed: say how, rather than a cryptic ORT error
        raise SystemExit(f"decoder inputs {sorted(inputs)} != decode_feeds {sorted(feeds)}")
    for name, value in feeds.items():
        want = inputs[name].shape
        if len(want) != value.ndim or any(isinstance(w, int) and w != v for w, v in zip(want, value.shape)):
            raise SystemExit(f"{name}: graph shape {want}, fed {list(value.shape)}")
    names = [o.name for o in sess.get_outputs()]
    res["graph_outputs"] = len(names)
    t1 = time.perf_counter()
    outs = dict(zip(names, sess.run(None, feeds)))
    res["run_s"] = time.perf_counter() - t1
    ref = np.load(out_dir / "ref.npz")
    logits = outs["logits"]
    res["logits_shape"] = list(logits.shape)
    res["present_shape"] = list(outs[f"present.{layers - 1}.value"].shape)
    res["logits_finite"] = bool(np.isfinite(logits).all())
    res["max_abs_diff_logits"] = float(np.abs(logits - ref["logits"]).max())
    res["max_abs_logit"] = float(np.abs(ref["logits"]).max())
    res["max_abs_diff_present"] = max(float(np.abs(outs[n] - ref[n]).max()) for n in compared_outputs(layers)[1:])
    res["argmax_match"] = bool((logits.argmax(-1) == ref["logits"].argmax(-1)).all())
    res["hwm_kib"] = proc_status_kib("VmHWM")
    result_file.write_text(json.dumps(res))


# ---------------------------------------------------------------------------------------------
# full-export mode: child 3 builds + saves the model, child 4 runs export_model at one precision
# ---------------------------------------------------------------------------------------------
#: --precisions names -> (export_model precision, int4_method)
PRECISION_RUNS = {"fp32": ("fp32", None), "fp16": ("fp16", None), "int8": ("int8", None),
                  "int8-wo": ("int8-wo", None), "int4-wo": ("int4-wo", "awq"), "int4-wo-rtn": ("int4-wo", "rtn")}


def reset_hwm() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: clear_refs 5); False where not allowed."""
    from tops_edge.bench.device import PeakMemory

    return PeakMemory._reset_hwm()


class PhasePeaks(RssSampler):
    """RssSampler whose phase switches also read VmHWM and reset it, so each phase's peak is exact
    (the kernel's high-water mark over the phase), not only the 50 ms samples. The HWM reset also
    resets what wait4's ru_maxrss reports for the process, so the whole run's peak is the max over
    the phases."""

    def __init__(self, interval: float = 0.05):
        super().__init__(interval)
        self.hwm: dict[str, int] = {}
        self.anon_peaks: dict[str, int] = {}
        self.events: list[dict] = []
        self.exact = reset_hwm()
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()

    def sample(self):
        with self._lock:
            super().sample()
            anon = proc_status_kib("RssAnon")  # RSS = anonymous + file-backed (mmapped safetensors) + shmem
            self.anon_peaks[self.phase] = max(self.anon_peaks.get(self.phase, 0), anon)

    def set_phase(self, name: str):
        with self._lock:
            rss = proc_status_kib("VmRSS")
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            anon = proc_status_kib("RssAnon")
            self.anon_peaks[self.phase] = max(self.anon_peaks.get(self.phase, 0), anon)
            self.hwm[self.phase] = max(self.hwm.get(self.phase, 0), proc_status_kib("VmHWM"))
            if self.exact:
                reset_hwm()
            self.events.append({"phase": name, "t_s": round(time.perf_counter() - self._t0, 2), "rss_kib": rss,
                                "rss_anon_kib": proc_status_kib("RssAnon"), "rss_file_kib": proc_status_kib("RssFile")})
            self.phase = name

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.set_phase("end")

    def phase_peaks(self) -> dict[str, int]:
        """Per phase: the exact HWM where it could be reset, else the sampled maximum."""
        src = self.hwm if self.exact else self.peaks
        return {k: max(v, self.peaks.get(k, 0)) for k, v in src.items() if k != "start"}


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in module.parameters()}.values())


def child_save(layers: int, model_dir: Path, result_file: Path) -> None:
    """Builds the L-layer model (7B text shapes, tiny vision), saves it as a HF folder (model +
    processor) and checks that tops_edge.models.load reads it back with the same weights."""
    import torch

    from tops_edge.models import load
    from tops_edge.models.tiny import build_tiny_llava

    res: dict = {"layers": layers}
    t0 = time.perf_counter()
    model, processor = build_tiny_llava(seed=0, text=dict(TEXT_7B, num_hidden_layers=layers))
    res["build_s"] = time.perf_counter() - t0
    res["model_param_bytes"] = param_bytes(model)
    res["model_params"] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.language_model
    res["text_param_bytes"] = param_bytes(lm) + param_bytes(model.lm_head)
    res["vision_param_bytes"] = param_bytes(model.model.vision_tower)
    res["projector_param_bytes"] = param_bytes(model.model.multi_modal_projector)
    sums = {n: float(p.double().sum()) for n, p in model.named_parameters()}
    if not all(np.isfinite(v) for v in sums.values()):
        raise SystemExit("non-finite weights after init")
    t1 = time.perf_counter()
    model.save_pretrained(str(model_dir))
    processor.save_pretrained(str(model_dir))
    res["save_s"] = time.perf_counter() - t1
    res["files"] = {f.name: f.stat().st_size for f in sorted(model_dir.iterdir()) if f.is_file()}
    del model, processor
    import gc

    gc.collect()
    t2 = time.perf_counter()
    adapter = load(str(model_dir))  # as tops-export loads a local HF directory
    res["load_s"] = time.perf_counter() - t2
    res["loaded_adapter"] = type(adapter).__name__
    res["loaded_num_layers"] = adapter.num_layers
    loaded = {n: float(p.double().sum()) for n, p in adapter.model.named_parameters()} \
        if hasattr(adapter, "model") else {}
    res["loaded_param_bytes"] = param_bytes(adapter.model) if hasattr(adapter, "model") else None
    bad = sorted(n for n in sums if n not in loaded or abs(loaded[n] - sums[n]) > 1e-6 * max(1.0, abs(sums[n])))
    res["reload_mismatched_params"] = bad[:10]
    res["reload_ok"] = not bad and res["loaded_num_layers"] == layers and res["loaded_param_bytes"] == res["model_param_bytes"]
    res["torch_threads"] = torch.get_num_threads()
    result_file.write_text(json.dumps(res))
    if not res["reload_ok"]:
        raise SystemExit(f"tops_edge.models.load({model_dir}) did not give back the saved model: {res}")


def child_full(model_dir: Path, out_dir: Path, precision_name: str, result_file: Path) -> None:
    """tops_edge.export.export_model(model_dir, out_dir, precision) with per-phase peak RSS: loading
    the model, each part's torch export, preprocessing + manifest, and then (non-fp32) the precision
    passes, split into the calibration capture, each part's conversion and its re-save."""
    import importlib

    import torch

    import tops_edge.calib as calib
    import tops_edge.calib.capture as capture_mod
    import tops_edge.calib.int4 as int4
    import tops_edge.calib.passes as passes
    import tops_edge.export.onnx_export as onnx_export

    exporter = importlib.import_module("tops_edge.export.exporter")
    precision, int4_method = PRECISION_RUNS[precision_name]
    res: dict = {"precision_name": precision_name, "precision": precision, "int4_method": int4_method,
                 "torch_threads": torch.get_num_threads(), "rss_at_start_kib": proc_status_kib("VmRSS")}
    sampler = PhasePeaks()
    state = {"base": "load"}

    def wrap(module, name, phase_of):
        real = getattr(module, name)

        def wrapper(*a, **kw):
            phase = phase_of(*a, **kw)
            if phase is not None:
                sampler.set_phase(phase)
            return real(*a, **kw)

        setattr(module, name, wrapper)
        return real

    def in_passes() -> bool:
        return state["base"] == "passes"

    def enter_passes(*a, **kw):
        res["hwm_before_passes_kib"] = proc_status_kib("VmHWM")
        res["rss_at_passes_kib"] = proc_status_kib("VmRSS")
        res["torch_weights_alive_at_passes"] = _live_torch_param_bytes()
        state["base"] = "passes"
        return "passes:start"

    patches = [
        (exporter, "export_part", lambda part, *a, **kw: f"export:{part.name}"),
        (exporter, "write_manifest", lambda *a, **kw: "passes:manifest" if in_passes() else "preprocessing+manifest"),
        (onnx_export, "save_graph", lambda src, dst, *a, **kw:
            f"passes:{Path(dst).name.split('.')[0]}:save" if in_passes() else None),
        (calib, "convert_parts", enter_passes),
        (capture_mod, "capture", lambda *a, **kw: "passes:capture"),
        (passes, "to_fp16", lambda src, *a, **kw: f"passes:{Path(src).name.split('.')[0]}:convert"),
        (passes, "to_int8_weight_only", lambda src, *a, **kw: f"passes:{Path(src).name.split('.')[0]}:convert"),
        (passes, "to_int8", lambda src, *a, **kw: f"passes:{Path(src).name.split('.')[0]}:convert"),
        (int4, "to_int4_weight_only", lambda src, *a, **kw: f"passes:{Path(src).name.split('.')[0]}:convert"),
    ]
    for module, name, phase_of in patches:
        wrap(module, name, phase_of)

    from tops_edge.export import export_model

    t0 = time.perf_counter()
    error = None
    with sampler:
        sampler.set_phase("load")
        try:
            export_model(str(model_dir), out_dir, precision=precision, int4_method=int4_method, progress=False)
        except Exception as exc:  # noqa: BLE001 - keep the peaks measured up to the failure
            import traceback

            error = f"{type(exc).__name__}: {exc}"
            res["error"] = error
            res["error_phase"] = sampler.phase
            res["error_traceback"] = traceback.format_exc()[-4000:]
    res["export_s"] = time.perf_counter() - t0
    res["hwm_exact"] = sampler.exact
    res["phase_peaks_kib"] = sampler.phase_peaks()
    res["sampled_peaks_kib"] = {k: v for k, v in sampler.peaks.items() if k != "start"}
    res["sampled_anon_peaks_kib"] = {k: v for k, v in sampler.anon_peaks.items() if k != "start"}
    res["events"] = sampler.events
    pre = {k: v for k, v in res["phase_peaks_kib"].items() if not k.startswith("passes") and k != "end"}
    post = {k: v for k, v in res["phase_peaks_kib"].items() if k.startswith("passes")}
    res["peak_pre_passes_kib"] = max(pre.values())
    res["peak_passes_kib"] = max(post.values()) if post else None
    res["peak_total_kib"] = max(v for k, v in res["phase_peaks_kib"].items())
    res["rss_after_kib"] = proc_status_kib("VmRSS")
    if error is not None:
        result_file.write_text(json.dumps(res))
        raise SystemExit(f"export_model failed in phase {res['error_phase']}: {error}")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    res["part_precisions"] = {k: v["precision"] for k, v in manifest["parts"].items()}
    res["files"] = {str(f.relative_to(out_dir)): f.stat().st_size for f in sorted(out_dir.rglob("*")) if f.is_file()}
    res["files_bytes"] = sum(res["files"].values())
    res["onnx_bytes"] = sum(v for k, v in res["files"].items() if ".onnx" in k)
    result_file.write_text(json.dumps(res))


def _live_torch_param_bytes() -> int:
    """Bytes of torch nn.Parameters still reachable (the exporter should have dropped its model)."""
    import gc

    import torch

    seen, total = set(), 0
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.nn.Parameter) and id(obj) not in seen:
                seen.add(id(obj))
                total += obj.numel() * obj.element_size()
        except Exception:  # noqa: BLE001 - some objects raise on isinstance
            pass
    return total


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


#: LLaVA-1.5-7B's parameter count (CLIP ViT-L/14-336 + projector + Llama-2-7B with vocab 32064)
REAL_7B_PARAMS = 7.06e9
REAL_7B_FP32_BYTES = 4 * REAL_7B_PARAMS


def write_report(path: Path | None, report: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))


def run_full(layer_list, precisions, root: Path, temp: bool, json_path: Path | None, report: dict) -> int:
    """Full-export mode: per L, one saved model; per precision, one export_model child."""
    t_all = time.perf_counter()
    failed = []
    try:
        for L in layer_list:
            ldir = root / f"L{L}"
            if ldir.exists():
                shutil.rmtree(ldir)
            model_dir = ldir / "model"
            model_dir.mkdir(parents=True)
            print(f"[L={L}] build + save_pretrained + tops_edge.models.load ...", flush=True)
            sv, save_peak, save_wall = run_child(["--_child", "save", "--layers", str(L), "--_model", str(model_dir)],
                                                 ldir / "save.json", ldir / "save.log")
            entry = {"layers": L, "save": sv, "save_peak_rss_kib": save_peak, "save_wall_s": save_wall, "exports": {}}
            report["runs"].append(entry)
            print(f"[L={L}] model {gib(sv['model_param_bytes'], False):.2f} GiB fp32 ({sv['model_params'] / 1e9:.3f}B "
                  f"params), saved {gib(sum(sv['files'].values()), False):.2f} GiB, reload ok={sv['reload_ok']}, "
                  f"{save_wall:.0f} s", flush=True)
            for name in precisions:
                out = ldir / f"export-{name}"
                print(f"[L={L}] export_model precision={name} ...", flush=True)
                try:
                    r, _, wall = run_child(["--_child", "full", "--_model", str(model_dir), "--out", str(out),
                                            "--_precision", name],
                                           ldir / f"{name}.json", ldir / f"{name}.log")
                    r["wall_s"] = wall
                    passes = f"{gib(r['peak_passes_kib']):.2f}" if r["peak_passes_kib"] else "-"
                    print(f"[L={L}] {name}: peak {gib(r['peak_total_kib']):.2f} GiB (before passes "
                          f"{gib(r['peak_pre_passes_kib']):.2f}, passes {passes}), files "
                          f"{gib(r['files_bytes'], False):.2f} GiB, {wall:.0f} s", flush=True)
                except RuntimeError as exc:  # one precision failing does not lose the others
                    partial = ldir / f"{name}.json"  # a failed export_model still writes its peaks so far
                    r = json.loads(partial.read_text()) if partial.is_file() else {}
                    r["error"] = r.get("error") or str(exc)[-3000:]
                    r["child_output_tail"] = str(exc)[-3000:]
                    failed.append((L, name))
                    print(f"[L={L}] {name} FAILED: {str(exc)[-1500:]}", flush=True)
                entry["exports"][name] = r
                shutil.rmtree(out, ignore_errors=True)
                for leftover in ldir.glob(f".export-{name}*"):  # a staging folder a killed child left
                    shutil.rmtree(leftover, ignore_errors=True)
                report["total_s"] = time.perf_counter() - t_all
                write_report(json_path, report)  # partial results survive an interrupted run
            shutil.rmtree(model_dir, ignore_errors=True)
            if temp:
                shutil.rmtree(ldir, ignore_errors=True)
    finally:
        if temp:
            shutil.rmtree(root, ignore_errors=True)
        else:  # keep the logs and JSONs, never the multi-GB model and exports
            for L in layer_list:
                shutil.rmtree(root / f"L{L}" / "model", ignore_errors=True)
    report["total_s"] = time.perf_counter() - t_all
    summarize_full(report)
    print(f"Total time {report['total_s']:.0f} s")
    write_report(json_path, report)
    if json_path:
        print(f"wrote {json_path}")
    return 1 if failed else 0


def _phase_summary(r: dict, top: int = 3) -> str:
    peaks = sorted(r["phase_peaks_kib"].items(), key=lambda kv: -kv[1])[:top]
    return ", ".join(f"{k} {gib(v):.2f}" for k, v in peaks)


def summarize_full(report: dict) -> None:
    runs = report["runs"]
    lines = ["| precision | L | model fp32 (GiB) | peak to passes (GiB) | peak in passes (GiB) | peak (GiB) "
             "| peak / model fp32 | export files (GiB) | wall s | highest phases (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in report["precisions"]:
        for e in runs:
            r = e["exports"].get(name)
            if r is None:
                continue
            w = e["save"]["model_param_bytes"]
            if "error" in r:
                peaks = r.get("phase_peaks_kib")
                upto = f"; peak before failing {gib(max(peaks.values())):.2f} GiB: {_phase_summary(r)}" if peaks else ""
                lines.append(f"| {name} | {e['layers']} | {gib(w, False):.2f} | FAILED in {r.get('error_phase', '?')}: "
                             f"{r['error'][:120]}{upto} | | | | | | |")
                continue
            passes = f"{gib(r['peak_passes_kib']):.2f}" if r["peak_passes_kib"] else "-"
            lines.append(f"| {name} | {e['layers']} | {gib(w, False):.2f} | {gib(r['peak_pre_passes_kib']):.2f} | {passes} "
                         f"| {gib(r['peak_total_kib']):.2f} | {r['peak_total_kib'] * 1024 / w:.2f} "
                         f"| {gib(r['files_bytes'], False):.2f} | {r['wall_s']:.0f} | {_phase_summary(r)} |")
    print()
    print("\n".join(lines))

    # the model's fp32 bytes are exactly linear in L: extrapolate them the same way
    ls = [e["layers"] for e in runs]
    fits: dict = {}
    report["fits"] = fits
    if len(set(ls)) < 2:
        print("\n(one layer count only: no extrapolation)")
        return
    wa, wb, _ = fit_line(ls, [e["save"]["model_param_bytes"] for e in runs])
    w32 = wa + wb * TARGET_LAYERS
    report["model_fp32_bytes_32"] = w32
    report["real_7b_fp32_bytes"] = REAL_7B_FP32_BYTES
    print(f"\nModel fp32 weights: {gib(wa, False):.3f} + {gib(wb, False):.4f} * L GiB -> {gib(w32, False):.2f} GiB at "
          f"{TARGET_LAYERS} layers (tiny vision tower; the real LLaVA-1.5-7B is {gib(REAL_7B_FP32_BYTES, False):.1f} GiB: "
          f"its CLIP ViT-L adds {gib(REAL_7B_FP32_BYTES - w32, False):.2f} GiB not measured here)")
    lines = ["| precision | fit over L | peak(L) GiB | to passes(L) | passes(L) | peak @32 (GiB) | to passes @32 "
             "| passes @32 | peak @32 / model fp32 @32 | peak @32 / 26.3 GiB (real 7B) | files @32 (GiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in report["precisions"]:
        pts = [(e["layers"], e["exports"][name], e["save"]["model_param_bytes"]) for e in runs
               if name in e["exports"] and "error" not in e["exports"][name]]
        big = [p for p in pts if p[0] >= 3]  # L>=3: torch writes external data, as at 32 layers
        use = big if len({p[0] for p in big}) >= 2 else pts
        if len({p[0] for p in use}) < 2:
            continue
        xs = [p[0] for p in use]

        def line(key, use=use, xs=xs):
            if any(p[1][key] is None for p in use):
                return None
            a, b, res = fit_line(xs, [gib(p[1][key]) for p in use])
            return {"a_gib": a, "b_gib_per_layer": b, "max_residual_gib": res, "at_32_gib": a + b * TARGET_LAYERS}

        tot, pre, post = line("peak_total_kib"), line("peak_pre_passes_kib"), line("peak_passes_kib")
        fa, fb, _ = fit_line(xs, [p[1]["files_bytes"] for p in use])
        f = {"layers": xs, "peak_total": tot, "peak_pre_passes": pre, "peak_passes": post,
             "files_bytes_32": fa + fb * TARGET_LAYERS,
             "ratio_to_model_fp32_32": tot["at_32_gib"] * GiB / w32,
             "ratio_to_real_7b_fp32": tot["at_32_gib"] * GiB / REAL_7B_FP32_BYTES,
             "in_proto_points_used": any(x < 3 for x in xs)}
        fits[name] = f

        def fmt(d):
            return f"{d['a_gib']:.2f} + {d['b_gib_per_layer']:.3f} L" if d else "-"

        def at32(d):
            return f"{d['at_32_gib']:.1f}" if d else "-"

        lines.append(f"| {name} | {','.join(map(str, xs))} | {fmt(tot)} | {fmt(pre)} | {fmt(post)} | {at32(tot)} "
                     f"| {at32(pre)} | {at32(post)} | {f['ratio_to_model_fp32_32']:.2f} | {f['ratio_to_real_7b_fp32']:.2f} "
                     f"| {gib(f['files_bytes_32'], False):.1f} |")
    print()
    print("\n".join(lines))
    if any(f["in_proto_points_used"] for f in fits.values()):
        print("WARNING: fits include L<=2, whose decoder graph stays under 2 GB (weights inside the protobuf); the "
              "32-layer export writes external data: use --layers 3,4 for figures that match it")


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
    ap.add_argument("--precisions", default=None,
                    help="comma list of " + ", ".join(PRECISION_RUNS) + " (int4-wo is AWQ: 16 fp32 calibration "
                         "prefills in ONNX Runtime, slow; int4-wo-rtn is int4-wo with round-to-nearest scales). "
                         "Given: measure full tops_edge.export.export_model runs of a saved L-layer model at each "
                         "precision instead of the decoder-only export (suggest --layers 3,4)")
    ap.add_argument("--_child", choices=["export", "ort", "save", "full"], help=argparse.SUPPRESS)
    ap.add_argument("--_result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_model", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_precision", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    layer_list = [int(s) for s in args.layers.split(",") if s.strip()]
    if args._child:
        out_dir = args.out
        if args._child == "export":
            child_export(layer_list[0], out_dir, args._result, args.opset)
        elif args._child == "ort":
            child_ort(layer_list[0], out_dir, args._result)
        elif args._child == "save":
            child_save(layer_list[0], args._model, args._result)
        else:
            child_full(args._model, out_dir, args._precision, args._result)
        return 0

    if not layer_list or min(layer_list) < 1:
        ap.error("--layers needs positive integers")
    precisions = None
    if args.precisions is not None:
        precisions = [s.strip() for s in args.precisions.split(",") if s.strip()]
        unknown = [p for p in precisions if p not in PRECISION_RUNS]
        if unknown or not precisions:
            ap.error(f"--precisions: unknown {unknown}; choose from {', '.join(PRECISION_RUNS)}")
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
        "env": {k: os.environ.get(k) for k in ("TOPS_EDGE_THREADS", "OMP_NUM_THREADS")},
    }
    if precisions is not None:
        report["mode"] = "full-export"
        report["precisions"] = precisions
        return run_full(layer_list, precisions, root, temp, args.json, report)
    report["mode"] = "decoder-only"
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
