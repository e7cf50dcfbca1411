"""Backends behind one small interface: sessions with named inputs and outputs, and a decoder runner
whose KV cache is allocated once and fed through IO binding.

The decoder follows optimum's IO (`past_key_values.{i}.key` in, `present.{i}.key` = past + new out).
Its KV cache is two buffers per tensor, allocated once for the whole generation: each step reads the
past from one and ORT writes `present` straight into the other, then they swap. Nothing in the decode
loop allocates.
"""

from __future__ import annotations

import functools
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import BackendUnavailableError

BACKENDS = ("ort", "trt")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    itemsize: int = 4

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.itemsize


class Session(ABC):
    input_names: list[str]
    output_names: list[str]
    #: wall time spent inside the backend's run calls since the last reset (orchestration overhead
    #: is a pipeline's time outside them)
    busy_ms: float = 0.0

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def bind(self, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]):
        """A run over fixed buffers, for per-token loops: returns a function of no arguments that runs
        the session on the current contents of `inputs` and writes into `outputs` in place. The
        caller keeps the arrays (C-contiguous, of the graph's dtypes and shapes) and overwrites them
        between calls. This default copies through `run`; backends bind the memory once instead."""

        def run_bound() -> None:
            result = self.run(inputs)
            for name, buffer in outputs.items():
                buffer[...] = result[name]
        return run_bound


class DecoderRunner(ABC):
    """Prefill and decode steps over a KV cache that lives inside the runner."""

    def __init__(self, layout: KVLayout, hidden_size: int):
        self.layout = layout
        self.hidden_size = hidden_size
        self.length = 0  # tokens now in the cache
        self.busy_ms = 0.0  # as Session.busy_ms

    @abstractmethod
    def reserve(self, capacity: int) -> None:
        """Make room for `capacity` cached tokens; allocates only when it grows."""

    @abstractmethod
    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray,
             attention_bias: np.ndarray | None = None) -> np.ndarray:
        """Feed [1, S, D] embeddings at the given positions; returns the last position's logits [V].
        `attention_bias` [1, S] (default 0) is added to every later attention logit on these tokens:
        log(n) for a token that stands for n merged ones. It stays with the cached tokens."""

    @property
    def token_embeds(self) -> np.ndarray:
        """The [1, 1, D] float32 buffer `step_token` reads: write (or `Session.bind`) the next token's
        embedding into it."""
        if getattr(self, "_token_embeds", None) is None:
            self._token_embeds = np.zeros((1, 1, self.hidden_size), dtype=np.float32)
        return self._token_embeds

    def step_token(self, position: int) -> np.ndarray:
        """One decode step on `token_embeds` at `position`; returns the logits [V]. Same result as
        `step(token_embeds, [[position]])`; backends skip rebinding what did not change."""
        return self.step(self.token_embeds, np.array([[position]], dtype=np.int64))

    def reset(self) -> None:
        self.length = 0

    @property
    def bytes_used(self) -> int:
        return self.length * self.layout.bytes_per_token()


class Backend(ABC):
    name: str

    @abstractmethod
    def session(self, path: Path | bytes) -> Session:
        """A session on a graph file or a serialized ONNX model."""

    @abstractmethod
    def decoder(self, path: Path, layout: KVLayout) -> DecoderRunner: ...


# --- ONNX Runtime --------------------------------------------------------------------------------
class OrtSession(Session):
    def __init__(self, sess):
        self.sess = sess
        self.input_names = [i.name for i in sess.get_inputs()]
        self.output_names = [o.name for o in sess.get_outputs()]

    def run(self, feeds):
        t = time.perf_counter()
        outputs = self.sess.run(self.output_names, feeds)
        self.busy_ms += (time.perf_counter() - t) * 1e3
        return dict(zip(self.output_names, outputs))

    def bind(self, inputs, outputs):
        binding = self.sess.io_binding()
        for name, buffer in inputs.items():
            binding.bind_input(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        for name, buffer in outputs.items():
            binding.bind_output(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        run, clock = self.sess.run_with_iobinding, time.perf_counter

        def run_bound() -> None:
            t = clock()
            run(binding)
            self.busy_ms += (clock() - t) * 1e3
        return run_bound


class OrtDecoderRunner(DecoderRunner):
    def __init__(self, sess, layout: KVLayout, device: str):
        super().__init__(layout, int(next(i for i in sess.get_inputs() if i.name == "inputs_embeds").shape[-1]))
        import onnxruntime as ort

        self._ort = ort
        self.sess = sess
        self.device = device
        self.past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        # the KV IO dtype is the graph's: fp16 exports take and give fp16 KV (calib/), the rest fp32
        past_type = next(i.type for i in sess.get_inputs() if i.name in self.past_names)
        self.kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        self.layout = replace(layout, itemsize=np.dtype(self.kv_dtype).itemsize)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        vocab = sess.get_outputs()[0].shape[-1]
        self.logits = np.empty((1, 1, vocab), dtype=np.float32)
        self.binding = sess.io_binding()
        # the logits buffer never changes: bound once; only the per-step inputs and KV are rebound
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)
        self.capacity = 0
        self._buffers: list = []  # the OrtValues that own the KV memory
        self._src: list[int] = []  # pointers: past is read from these ...
        self._dst: list[int] = []  # ... and present written to these; they swap each step
        self._mask = np.ones((1, 0), dtype=np.int64)
        self._bias = np.zeros((1, 0), dtype=np.float32)  # attention_bias of the cached tokens
        self._position = np.zeros((1, 1), dtype=np.int64)
        self._token_bound = False  # whether inputs_embeds / position_ids are bound to the one-token buffers
        self._bind_kv, self._bind_mask = self._kv_binder(ort)

    def reserve(self, capacity: int) -> None:
        if capacity <= self.capacity:
            return
        per = self.layout.num_kv_heads * self.layout.head_dim * capacity
        alloc = self._ort.OrtValue.ortvalue_from_shape_and_type
        self._buffers = [alloc([per], self.kv_dtype, self.device, 0) for _ in range(2 * len(self.past_names))]
        ptrs = [buf.data_ptr() for buf in self._buffers]  # fixed for the buffers' lifetime
        self._src, self._dst = ptrs[: len(self.past_names)], ptrs[len(self.past_names) :]
        self._mask = np.ones((1, capacity), dtype=np.int64)
        self._bias = np.zeros((1, capacity), dtype=np.float32)
        self.capacity = capacity
        self.length = 0

    def _kv_binder(self, ort):
        """Binds one layer's past (input) and present (output) to raw device buffers.

        16 of a step's 19 bindings are KV (at 4 layers); the public IOBinding methods rebuild the
        device descriptor on every call, which was most of the decode loop's time outside ORT. The
        native binder with one cached descriptor does the same; any other onnxruntime falls back."""
        b = self.binding
        native = getattr(b, "_iobinding", None)
        try:
            device = ort.OrtDevice.make(self.device, 0)._get_c_device()
        except Exception:
            native = None
        if native is None or not hasattr(native, "bind_input") or not hasattr(native, "bind_output"):
            def bind_public(past, present, past_shape, total_shape, src, dst):
                b.bind_input(past, self.device, 0, self.kv_dtype, past_shape, src)
                b.bind_output(present, self.device, 0, self.kv_dtype, total_shape, dst)

            def mask_public(total):
                b.bind_cpu_input("attention_mask", self._mask[:, :total])
                b.bind_cpu_input("attention_bias", self._bias[:, :total])
            return bind_public, mask_public

        cpu = device if self.device == "cpu" else ort.OrtDevice.make("cpu", 0)._get_c_device()

        def bind_native(past, present, past_shape, total_shape, src, dst):
            native.bind_input(past, device, self.kv_dtype, past_shape, src)
            native.bind_output(present, device, self.kv_dtype, total_shape, dst)

        def mask_native(total):  # the mask (all ones) and bias buffers outlive the binding (see reserve)
            native.bind_input("attention_mask", cpu, np.int64, [1, total], self._mask.ctypes.data)
            native.bind_input("attention_bias", cpu, np.float32, [1, total], self._bias.ctypes.data)
        return bind_native, mask_native

    def step(self, inputs_embeds, position_ids, attention_bias=None):
        b = self.binding
        seq = inputs_embeds.shape[1]
        b.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        self._token_bound = False
        if self.length + seq <= self.capacity:
            self._bias[0, self.length : self.length + seq] = 0.0 if attention_bias is None else attention_bias[0]
        return self._run(seq)

    def step_token(self, position):
        """The decode loop's step: the one-token buffers are bound once, so per token only the
        position is written and the mask and KV rebound (their lengths change)."""
        if not self._token_bound:
            self.binding.bind_cpu_input("inputs_embeds", self.token_embeds)
            self.binding.bind_cpu_input("position_ids", self._position)
            self._token_bound = True
        self._position[0, 0] = position
        if self.length < self.capacity:
            self._bias[0, self.length] = 0.0
        return self._run(1)

    def _run(self, seq: int) -> np.ndarray:
        past, total = self.length, self.length + seq
        if total > self.capacity:
            raise RuntimeError(f"KV cache holds {self.capacity} tokens, step needs {total}")  # a bug, not user input
        b = self.binding
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        self._bind_mask(total)
        past_shape, total_shape = [1, h, past, d], [1, h, total, d]
        for name, out_name, src, dst in zip(self.past_names, self.present_names, self._src, self._dst):
            self._bind_kv(name, out_name, past_shape, total_shape, src, dst)
        t = time.perf_counter()
        self.sess.run_with_iobinding(b)
        self.busy_ms += (time.perf_counter() - t) * 1e3
        self._src, self._dst = self._dst, self._src
        self.length = total
        return self.logits[0, -1]


@functools.lru_cache(maxsize=1)
def cpu_int8_is_exact() -> bool:
    """True unless this is an x86 CPU without VNNI (where ORT's fused u8s8 kernels can saturate)."""
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False  # x86 and unknown: take the exact path
    return "avx512_vnni" in flags or "avx_vnni" in flags


class OrtBackend(Backend):
    name = "ort"

    def __init__(self, device: str = "auto", threads: int | None = None, qdq_fusion: bool | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError("the ONNX Runtime backend needs `onnxruntime` (pip install onnxruntime)") from None
        self._ort = ort
        available = ort.get_available_providers()
        want_cuda = device in ("auto", "cuda") and "CUDAExecutionProvider" in available
        if device == "cuda" and not want_cuda:
            raise BackendUnavailableError("device 'cuda' needs onnxruntime-gpu with CUDA (pip install tops-edge[gpu])")
        self.providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3  # a missing CUDA library falls back to CPU; we report it ourselves
        threads = threads or int(os.environ.get("TOPS_EDGE_THREADS", "0"))
        # The pipeline runs its sessions one after another. A session's pool keeps spinning after its
        # run and steals the cores the next session needs (measured: prefill at K=128 ran ~2.7x slower
        # right after the selector), so the pools sleep instead. A process-wide pool would avoid that
        # too, but ORT then refuses every other session in the process that does not opt in.
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            self.options.intra_op_num_threads = threads
        # INT8 (Q/DQ) graphs: ORT CPU fuses DequantizeLinear -> MatMul -> ... into its u8s8 kernels,
        # which saturate on x86 CPUs without VNNI (AVX2's pmaddubsw adds pairs in int16). Measured on
        # the ShapesVQA model: prefill logits 2.65 from fp32 fused, 0.73 unfused, and 2.3 points of
        # accuracy. Unfused, ORT computes what the graph says (and what TensorRT implements); fused is
        # faster. Default: fuse only where the CPU has VNNI (or is not x86); TOPS_EDGE_QDQ_FUSION=0/1
        # or `qdq_fusion` decide otherwise.
        env = os.environ.get("TOPS_EDGE_QDQ_FUSION")
        if qdq_fusion is None and env in ("0", "1"):
            qdq_fusion = env == "1"
        self.qdq_fusion = cpu_int8_is_exact() if qdq_fusion is None else bool(qdq_fusion)
        if not self.qdq_fusion:
            self.options.add_session_config_entry("session.disable_quant_qdq", "1")

    def _open(self, path):
        """A session on a graph file, or on a serialized model (bytes)."""
        model = path if isinstance(path, bytes) else str(path)
        return self._ort.InferenceSession(model, sess_options=self.options, providers=self.providers)

    def session(self, path):
        return OrtSession(self._open(path))

    def decoder(self, path, layout):
        sess = self._open(path)
        device = "cuda" if "CUDAExecutionProvider" in sess.get_providers() else "cpu"
        return OrtDecoderRunner(sess, layout, device)


def get_backend(name: str, **options) -> Backend:
    if name == "ort":
        return OrtBackend(**options)
    if name == "trt":
        from .trt_backend import TrtBackend

        return TrtBackend(**options)
    raise BackendUnavailableError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
