"""Backends behind one small interface: sessions with named inputs and outputs, and a decoder runner
whose KV cache is allocated once and fed through IO binding.

The decoder follows optimum's IO names over a fixed-size cache (`past_key_values.{i}.key` [1, H, C, D]
in, `present.{i}.key` out: only this step's S new rows, [1, H, S, D]; `cache_position` names the slots
they belong to; see models/base.py `DecoderSegment`). Its KV cache is one buffer per tensor,
allocated once: each step reads the past from it in place (a step into an empty cache binds it as
0 slots, so a prefill scores only its own tokens), and the runner copies the returned rows into it
at slots [past, total) (a prefill: one slice assignment per tensor; a decode step: from [1, H, 1, D]
rows bound once). Every decode step has the same shapes, so everything is bound once per
generation: per token the loop writes a position and a slot into bound buffers, runs, and copies one
row per head and tensor. Nothing in the decode loop allocates or binds.
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
    """Prefill and decode steps over a KV cache that lives inside the runner: the whole decoder, or
    one segment of a decoder cut for in-LLM pruning (models/base.py DecoderSegment). A segment that
    ends at a cut (`hands_on`) returns hidden states and attention instead of logits; in the decode
    loop it writes its hidden state straight into the next segment's `token_embeds` (`hand_on_to`)."""

    #: True for a segment that ends at a cut (outputs cut_hidden_states, cut_attention)
    hands_on: bool = False
    #: True for a cut segment that also outputs cut_target_features (the next layer's probe, for
    #: selectors that read target_features: DecoderSegment `probe`)
    probes: bool = False
    #: rows of position_ids: 1 ([1, S]) or 3 (M-RoPE's [3, 1, S]; a decode step's rows are equal)
    position_rows: int = 1
    #: layers of this segment that take a `deepstack_embeds` row (Qwen3-VL's DeepStack), 0 for none
    deepstack_rows: int = 0

    def __init__(self, layout: KVLayout, hidden_size: int):
        self.layout = layout
        self.hidden_size = hidden_size
        self.length = 0  # tokens now in the cache
        self.busy_ms = 0.0  # as Session.busy_ms
        self.next_embeds: np.ndarray | None = None  # a cut segment's decode output: the next one's token_embeds

    def hand_on_to(self, following: "DecoderRunner") -> None:
        """Decode steps write this segment's hidden state into `following`'s token buffer."""
        self.next_embeds = following.token_embeds

    @abstractmethod
    def reserve(self, capacity: int) -> None:
        """Size the cache for the next generation (`capacity` tokens) and empty it; allocates only
        when it grows."""

    @abstractmethod
    def step(self, inputs_embeds: np.ndarray, position_ids: np.ndarray,
             attention_bias: np.ndarray | None = None, deepstack: np.ndarray | None = None):
        """Feed [1, S, D] embeddings (a later segment: hidden states) at the given positions; returns
        the last position's logits [V], or for a segment that hands on, (hidden states [1, S, D],
        attention [1, S, C]), and with `probes` a third, the next layer's post-attention-norm states
        [1, S, D] (cut_target_features). `attention_bias` [1, S] (default 0) is added to every later attention
        logit on these tokens: log(n) for a token that stands for n merged ones. It stays with the
        cached tokens. `deepstack` [n, 1, S, D] (a segment with `deepstack_rows` n): what each of its
        first n layers adds to these tokens' hidden states (zeros when None, and on decode steps)."""

    @property
    def token_embeds(self) -> np.ndarray:
        """The [1, 1, D] float32 buffer `step_token` reads: write (or `Session.bind`) the next token's
        embedding into it."""
        if getattr(self, "_token_embeds", None) is None:
            self._token_embeds = np.zeros((1, 1, self.hidden_size), dtype=np.float32)
        return self._token_embeds

    def step_token(self, position: int):
        """One decode step on `token_embeds` at `position`; returns the logits [V] (a segment that
        hands on writes its hidden state into `next_embeds` and returns None). Same result as
        `step(token_embeds, [[position]])`; backends skip rebinding what did not change."""
        out = self.step(self.token_embeds, np.full(self.position_shape(), position, dtype=np.int64))
        if not self.hands_on:
            return out
        self.next_embeds[...] = out[0]
        return None

    def position_shape(self, seq: int = 1) -> tuple[int, ...]:
        """The shape of one step's position_ids for `seq` tokens."""
        return (1, seq) if self.position_rows == 1 else (self.position_rows, 1, seq)

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
        inputs = {i.name: i for i in sess.get_inputs()}
        self.input_name = "inputs_embeds" if "inputs_embeds" in inputs else "hidden_states"  # later segments
        super().__init__(layout, int(inputs[self.input_name].shape[-1]))
        self.sess = sess
        self.device = device
        outputs = {o.name for o in sess.get_outputs()}
        self.hands_on = "cut_hidden_states" in outputs
        self.probes = "cut_target_features" in outputs
        self.position_rows = 3 if len(inputs["position_ids"].shape) == 3 else 1
        self.deepstack_rows = int(inputs["deepstack_embeds"].shape[0]) if "deepstack_embeds" in inputs else 0
        self._deepstack_token = np.zeros((self.deepstack_rows, 1, 1, self.hidden_size), dtype=np.float32)
        self._attention = np.zeros((1, 1, 0), dtype=np.float32)  # decode steps' cut_attention: not read
        self._target = np.zeros((1, 1, self.hidden_size), dtype=np.float32)  # decode steps' probe: not read
        self.past_names = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
        # the KV IO dtype is the graph's: fp16 exports take and give fp16 KV (calib/), the rest fp32
        past_type = next(i.type for i in sess.get_inputs() if i.name in self.past_names)
        self.kv_dtype = np.float16 if past_type == "tensor(float16)" else np.float32
        self.layout = replace(layout, itemsize=np.dtype(self.kv_dtype).itemsize)
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        vocab = sess.get_outputs()[0].shape[-1] if not self.hands_on else 0
        self.logits = np.empty((1, 1, vocab), dtype=np.float32)
        self.capacity = 0  # tokens the allocated buffers hold
        self.window = 0  # the cache size C this generation's steps see (<= capacity; see reserve)
        # the KV memory: one flat buffer per past tensor (numpy on the CPU, torch on CUDA), and the
        # [1, H, window, D] views of it the graph reads and the steps' rows are written into
        self._buffers: list = []
        self._views: list = []
        self._arrays = _HostArrays() if device == "cpu" else _CudaArrays()
        # decode steps' present rows [1, H, 1, D]: bound once, copied into the buffers after each step
        self._token_rows = [self._arrays.empty((1, layout.num_kv_heads, 1, layout.head_dim), self.kv_dtype)
                            for _ in self.past_names]
        # two bindings over the same buffers: `step` (any length; its present rows bound per call)
        # and `step_token` (the decode loop's: everything bound once)
        self._step_binding = self._token_binding = None
        self._token_bound = False  # whether the token binding's one-token inputs and outputs are bound
        self._step_past_empty = False  # whether the step binding's past inputs are bound as 0 slots
        self._mask = np.zeros((1, 0), dtype=np.int64)
        self._bias = np.zeros((1, 0), dtype=np.float32)  # attention_bias of the cached tokens
        self._position = np.zeros(self.position_shape(), dtype=np.int64)
        self._slot = np.zeros((1,), dtype=np.int64)

    def reserve(self, capacity: int) -> None:
        """Make the cache `capacity` slots for the next generation. Memory is allocated (zeroed: empty
        slots must be finite, see DecoderSegment) only when it grows; a smaller generation binds a
        [1, H, capacity, D] view of the same buffers, so its attention spans its own length only."""
        h, d = self.layout.num_kv_heads, self.layout.head_dim
        if capacity > self.capacity:
            self._buffers = [self._arrays.zeros(h * capacity * d, self.kv_dtype) for _ in self.past_names]
            self.capacity = capacity
            self.window = 0
        if capacity != self.window:
            self._views = [buf[: h * capacity * d].reshape(1, h, capacity, d) for buf in self._buffers]
            self._mask = np.zeros((1, capacity), dtype=np.int64)
            self._bias = np.zeros((1, capacity), dtype=np.float32)
            if self.hands_on:
                self._attention = np.zeros((1, 1, capacity), dtype=np.float32)
            self._step_binding, self._token_binding = self._bind_cache(), self._bind_cache()
            self._step_past_empty = False
            for name, rows in zip(self.present_names, self._token_rows):
                self._bind(self._token_binding, name, rows, output=True)
            self._token_bound = False
            self.window = capacity
        self.reset()

    def _bind(self, binding, name: str, array, output: bool = False) -> None:
        """Binds a KV array (a buffer view, its first 0 slots, or a step's rows) by address on the
        runner's device."""
        bind = binding.bind_output if output else binding.bind_input
        bind(name, self.device, 0, self.kv_dtype, list(array.shape), self._arrays.address(array))

    def _bind_cache(self):
        """An IO binding whose past inputs are the buffers and whose mask and bias are the runner's."""
        b = self.sess.io_binding()
        for name, view in zip(self.past_names, self._views):
            self._bind(b, name, view)
        for name, buffer in (("attention_mask", self._mask), ("attention_bias", self._bias)):
            _bind_buffer(b, name, buffer)
        if not self.hands_on:  # a cut segment binds its outputs per step kind (step / step_token)
            _bind_output(b, "logits", self.logits)
        return b

    def reset(self) -> None:
        super().reset()
        self._mask[...] = 0  # the bias of a slot is written when it is filled

    def hand_on_to(self, following: "DecoderRunner") -> None:
        super().hand_on_to(following)
        self._token_bound = False  # the decode binding's cut_hidden_states output changed

    def step(self, inputs_embeds, position_ids, attention_bias=None, deepstack=None):
        seq = inputs_embeds.shape[1]
        past, total = self._check_room(seq)
        b = self._step_binding
        b.bind_cpu_input(self.input_name, np.ascontiguousarray(inputs_embeds, dtype=np.float32))
        if self.deepstack_rows:
            if deepstack is None:
                deepstack = np.zeros((self.deepstack_rows, 1, seq, self.hidden_size), dtype=np.float32)
            b.bind_cpu_input("deepstack_embeds", np.ascontiguousarray(deepstack, dtype=np.float32))
        b.bind_cpu_input("position_ids", np.ascontiguousarray(position_ids, dtype=np.int64))
        b.bind_cpu_input("cache_position", np.arange(past, total, dtype=np.int64))
        if (past == 0) != self._step_past_empty:  # into an empty cache the past is 0 slots (no scores)
            self._step_past_empty = past == 0
            for name, view in zip(self.past_names, self._views):
                self._bind(b, name, view[:, :, :0] if past == 0 else view)
        rows = [self._arrays.empty((1, self.layout.num_kv_heads, seq, self.layout.head_dim), self.kv_dtype)
                for _ in self.present_names]
        for name, array in zip(self.present_names, rows):
            self._bind(b, name, array, output=True)
        self._mask[0, past:total] = 1
        self._bias[0, past:total] = 0.0 if attention_bias is None else attention_bias[0]
        if not self.hands_on:
            return self._run(b, rows, past, total)
        hidden = np.empty((1, seq, self.hidden_size), dtype=np.float32)
        attention = np.empty((1, seq, self.window), dtype=np.float32)
        _bind_output(b, "cut_hidden_states", hidden)
        _bind_output(b, "cut_attention", attention)
        if not self.probes:
            self._run(b, rows, past, total)
            return hidden, attention
        target = np.empty((1, seq, self.hidden_size), dtype=np.float32)
        _bind_output(b, "cut_target_features", target)
        self._run(b, rows, past, total)
        return hidden, attention, target

    def step_token(self, position):
        """The decode loop's step: everything is bound, so per token it writes the position, the slot
        and the slot's mask and bias entries, runs, and copies the new rows into the cache."""
        past, total = self._check_room(1)
        b = self._token_binding
        if not self._token_bound:
            for name, buffer in ((self.input_name, self.token_embeds), ("position_ids", self._position),
                                 ("cache_position", self._slot)):
                _bind_buffer(b, name, buffer)
            if self.deepstack_rows:  # decode steps add nothing (HF injects at prefill only)
                _bind_buffer(b, "deepstack_embeds", self._deepstack_token)
            if self.hands_on:  # the hidden state goes straight into the next segment's token buffer
                _bind_output(b, "cut_hidden_states", self.next_embeds)
                _bind_output(b, "cut_attention", self._attention)
                if self.probes:
                    _bind_output(b, "cut_target_features", self._target)
            self._token_bound = True
        self._position[...] = position
        self._slot[0] = past
        self._mask[0, past] = 1
        self._bias[0, past] = 0.0
        logits = self._run(b, self._token_rows, past, total)
        return None if self.hands_on else logits

    def _check_room(self, seq: int) -> tuple[int, int]:
        past, total = self.length, self.length + seq
        if total > self.window:
            raise RuntimeError(f"KV cache holds {self.window} tokens, step needs {total}")  # a bug, not user input
        return past, total

    def _run(self, binding, rows: list, past: int, total: int) -> np.ndarray:
        """Runs, then writes the step's present rows into the buffers at slots [past, total)."""
        t = time.perf_counter()
        self.sess.run_with_iobinding(binding)
        self._arrays.write(self._views, rows, past, total)
        self.busy_ms += (time.perf_counter() - t) * 1e3
        self.length = total
        return self.logits[0, -1] if not self.hands_on else None

    @property
    def bytes_allocated(self) -> int:
        """The KV memory the runner owns: one buffer per tensor of `capacity` slots."""
        return sum(self._arrays.nbytes(buf) for buf in self._buffers)


class _HostArrays:
    """KV arrays in host memory (ORT's CPU provider reads and writes them by address): numpy."""

    @staticmethod
    def zeros(n: int, dtype) -> np.ndarray:
        return _aligned_zeros(n, dtype)

    @staticmethod
    def empty(shape, dtype) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    @staticmethod
    def address(array: np.ndarray) -> int:
        return array.ctypes.data

    @staticmethod
    def nbytes(array: np.ndarray) -> int:
        return array.nbytes

    @staticmethod
    def write(views: list, rows: list, past: int, total: int) -> None:
        if total - past == 1:  # a decode step: one D-row per head
            for view, new in zip(views, rows):
                view[0, :, past] = new[0, :, 0]
        else:
            for view, new in zip(views, rows):
                view[:, :, past:total] = new


class _CudaArrays:
    """KV arrays in CUDA memory for ORT's CUDA provider, held as torch tensors (torch is a dependency;
    ORT's Python API copies no slices on the device). NOT verified here (no GPU on the development
    machines)."""

    def __init__(self):
        import torch

        self.torch = torch

    def _dtype(self, dtype):
        return self.torch.float16 if np.dtype(dtype) == np.float16 else self.torch.float32

    def zeros(self, n: int, dtype):
        return self.torch.zeros(n, dtype=self._dtype(dtype), device="cuda")

    def empty(self, shape, dtype):
        return self.torch.empty(tuple(shape), dtype=self._dtype(dtype), device="cuda")

    @staticmethod
    def address(array) -> int:
        return array.data_ptr()

    @staticmethod
    def nbytes(array) -> int:
        return array.numel() * array.element_size()

    def write(self, views: list, rows: list, past: int, total: int) -> None:
        for view, new in zip(views, rows):  # ORT's run has synchronized its outputs
            view[:, :, past:total].copy_(new)
        self.torch.cuda.current_stream().synchronize()  # before the next run reads the buffers


def _aligned_zeros(n: int, dtype, alignment: int = 64) -> np.ndarray:
    """n zeros whose first element sits on an `alignment`-byte boundary, as ORT's own allocator
    places its buffers (numpy guarantees 16)."""
    itemsize = np.dtype(dtype).itemsize
    raw = np.zeros(n + alignment // itemsize, dtype=dtype)
    start = (-raw.ctypes.data % alignment) // itemsize
    return raw[start : start + n]


def _bind_buffer(binding, name: str, buffer: np.ndarray) -> None:
    """Binds a host array by address: the run reads what the array holds at run time."""
    binding.bind_input(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)


def _bind_output(binding, name: str, buffer: np.ndarray) -> None:
    """Binds a host array by address as an output: the run writes into it."""
    binding.bind_output(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)


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
