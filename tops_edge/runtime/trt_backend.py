"""The TensorRT backend: the Backend / Session / DecoderRunner interface over engines from tops-build.

Engines and IO buffers live in torch CUDA tensors on one stream. The decoder's KV cache, attention
mask and logits are allocated once (`reserve`): one fixed-size KV buffer per tensor, as in the ORT
backend, bound as `past`; `present` (this step's new rows only, [1, H, S, D]) goes to a scratch
tensor that is copied into the buffer at the step's slots on the engine's stream (the past stays bound
at C slots on a prefill too: the engines' profiles start at 1 slot, where ORT binds 0). The shapes are set
once per generation; per step the new tokens' embeddings, positions and slots are copied in and the
logits row out (the Session interface is numpy, like ORT's). The pipeline opens parts by their .onnx
path; the backend runs the engine that engines.json (written by tops-build) records for that part.

NOT verified here (no TensorRT, no GPU on the development machines): scripts/verify_trt.sh runs it
against ONNX Runtime on a TensorRT host.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..engines.tensorrt_import import require_tensorrt
from .backend import Backend, DecoderRunner, KVLayout, Session


class _Engine:
    """A deserialized engine with an execution context and host-side bookkeeping of its IO."""

    def __init__(self, trt, runtime, path: Path):
        import torch

        self.torch = torch
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not load {path} (built for another device or TensorRT version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = lambda n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT  # noqa: E731
        self.input_names = [n for n in names if is_input(n)]
        self.output_names = [n for n in names if not is_input(n)]
        self.host_inputs = {n for n in self.input_names if self.engine.is_shape_inference_io(n)}
        self.dtypes = {n: torch.from_numpy(np.empty(0, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))).dtype for n in names}
        self.stream = torch.cuda.Stream()

    def bind_input(self, name: str, value: np.ndarray, keep: list):
        torch = self.torch
        if name in self.host_inputs:  # shape tensors (the budget K) are read on the host
            host = np.ascontiguousarray(value, dtype=torch.empty(0, dtype=self.dtypes[name]).numpy().dtype)
            keep.append(host)
            self.context.set_tensor_address(name, host.ctypes.data)
        else:
            dev = torch.as_tensor(np.ascontiguousarray(value)).to(device="cuda", dtype=self.dtypes[name], non_blocking=True)
            keep.append(dev)
            self.context.set_tensor_address(name, dev.data_ptr())
        self.context.set_input_shape(name, tuple(value.shape))

    def execute(self):
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")


class TrtSession(Session):
    def __init__(self, engine: _Engine):
        self.e = engine
        self.input_names = engine.input_names
        self.output_names = engine.output_names

    def run(self, feeds):
        torch, ctx = self.e.torch, self.e.context
        t = time.perf_counter()
        alive: list = []
        with torch.cuda.stream(self.e.stream):
            for name in self.input_names:
                self.e.bind_input(name, np.asarray(feeds[name]), alive)
            outputs = {}
            for name in self.output_names:
                out = torch.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.e.dtypes[name], device="cuda")
                ctx.set_tensor_address(name, out.data_ptr())
                outputs[name] = out
            self.e.execute()
            result = {name: out.cpu().numpy() for name, out in outputs.items()}
        self.busy_ms += (time.perf_counter() - t) * 1e3
        return result


class TrtDecoderRunner(DecoderRunner):
    """The decoder, or one segment of a decoder cut for in-LLM pruning: a later segment reads
    `hidden_states`, and one that ends at a cut returns its hidden states and attention (copied to
    the host per step; the decode loop's hand-on is DecoderRunner.step_token's), and with `probes`
    its cut_target_features too (as OrtDecoderRunner.step)."""

    def __init__(self, engine: _Engine, layout: KVLayout):
        self.input_name = "inputs_embeds" if "inputs_embeds" in engine.input_names else "hidden_states"
        super().__init__(layout, int(engine.engine.get_tensor_shape(self.input_name)[-1]))
        self.e = engine
        self.hands_on = "cut_hidden_states" in engine.output_names
        self.probes = "cut_target_features" in engine.output_names
        self.position_rows = 3 if len(engine.engine.get_tensor_shape("position_ids")) == 3 else 1
        self.deepstack_rows = (int(engine.engine.get_tensor_shape("deepstack_embeds")[0])
                               if "deepstack_embeds" in engine.input_names else 0)
        self.past_names = [n for n in engine.input_names if n.startswith("past_key_values.")]
        self.present_names = [n.replace("past_key_values.", "present.") for n in self.past_names]
        self.kv_dtype = engine.dtypes[self.past_names[0]]
        self.capacity = 0  # slots the allocated buffers hold
        self.window = 0  # the cache size C of this generation (see OrtDecoderRunner.reserve)
        self._buffers: list = []  # one flat buffer per past tensor
        self._views: list = []  # their [1, H, window, D] views: what past reads, where present is written
        self._rows: dict = {}  # step length -> the present scratch tensors [1, H, S, D] (decode: S = 1)
        self._mask = self._bias = self._logits = None

    def reserve(self, capacity: int) -> None:
        torch, ctx = self.e.torch, self.e.context
        if capacity > self.capacity:
            per = self.layout.num_kv_heads * self.layout.head_dim * capacity
            # zeroed: empty slots are masked out but must hold finite values (models/base.py DecoderSegment)
            self._buffers = [torch.zeros(per, dtype=self.kv_dtype, device="cuda") for _ in self.past_names]
            if not self.hands_on:
                vocab = self.e.engine.get_tensor_shape("logits")[-1]
                self._logits = torch.empty((1, 1, vocab), dtype=torch.float32, device="cuda")
            self.capacity = capacity
            self.window = 0
        if capacity != self.window:
            self._mask = torch.zeros((1, capacity), dtype=self.e.dtypes["attention_mask"], device="cuda")
            self._bias = torch.zeros((1, capacity), dtype=self.e.dtypes["attention_bias"], device="cuda")
            h, d = self.layout.num_kv_heads, self.layout.head_dim
            self._views = [buf[: h * capacity * d].view(1, h, capacity, d) for buf in self._buffers]
            for name, view in zip(self.past_names, self._views):
                ctx.set_input_shape(name, (1, h, capacity, d))  # a [1,h,C,d] view of the buffer's start
                ctx.set_tensor_address(name, view.data_ptr())
            for name, buffer in (("attention_mask", self._mask), ("attention_bias", self._bias)):
                ctx.set_input_shape(name, (1, capacity))
                ctx.set_tensor_address(name, buffer.data_ptr())
            if not self.hands_on:
                ctx.set_tensor_address("logits", self._logits.data_ptr())
            self.window = capacity
        self.e.stream.wait_stream(torch.cuda.current_stream())  # the zero fills above, before any step
        self.reset()

    def reset(self) -> None:
        super().reset()
        if self._mask is not None:
            with self.e.torch.cuda.stream(self.e.stream):  # ordered with the steps' writes and runs
                self._mask.zero_()

    def step(self, inputs_embeds, position_ids, attention_bias=None, deepstack=None):
        torch, ctx = self.e.torch, self.e.context
        seq = inputs_embeds.shape[1]
        past, total = self.length, self.length + seq
        if total > self.window:
            raise RuntimeError(f"KV cache holds {self.window} tokens, step needs {total}")  # a bug, not user input
        t = time.perf_counter()
        alive: list = []
        with torch.cuda.stream(self.e.stream):
            self.e.bind_input(self.input_name, inputs_embeds, alive)
            self.e.bind_input("position_ids", position_ids, alive)
            if self.deepstack_rows:  # Qwen3-VL: zeros unless given (decode steps)
                if deepstack is None:
                    deepstack = np.zeros((self.deepstack_rows, 1, seq, self.hidden_size), dtype=np.float32)
                self.e.bind_input("deepstack_embeds", np.ascontiguousarray(deepstack, dtype=np.float32), alive)
            self.e.bind_input("cache_position", np.arange(past, total, dtype=np.int64), alive)
            self._mask[0, past:total] = 1
            new_bias = 0.0 if attention_bias is None else torch.as_tensor(np.asarray(attention_bias[0], np.float32))
            self._bias[0, past:total] = new_bias  # the cached tokens' bias stays in the buffer
            rows = self._present_rows(seq)
            for name, buffer in zip(self.present_names, rows):
                ctx.set_tensor_address(name, buffer.data_ptr())
            if self.hands_on:  # this step's hidden states and attention, [1, S, D] and [1, S, C] (+ the probe)
                names = ("cut_hidden_states", "cut_attention") + (("cut_target_features",) if self.probes else ())
                outputs = [torch.empty((1, seq, self.hidden_size), dtype=torch.float32, device="cuda"),
                           torch.empty((1, seq, self.window), dtype=torch.float32, device="cuda")]
                if self.probes:
                    outputs.append(torch.empty((1, seq, self.hidden_size), dtype=torch.float32, device="cuda"))
                for name, buffer in zip(names, outputs):
                    ctx.set_tensor_address(name, buffer.data_ptr())
            self.e.execute()
            for view, new in zip(self._views, rows):  # this step's rows into the cache, on the same stream
                view[:, :, past:total].copy_(new)
            result = tuple(o.cpu().numpy() for o in outputs) if self.hands_on else self._logits.cpu().numpy()[0, -1]
        self.busy_ms += (time.perf_counter() - t) * 1e3
        self.length = total
        return result

    def _present_rows(self, seq: int) -> list:
        """Scratch tensors for a step's present outputs: kept for decode steps (S = 1), per call else."""
        rows = self._rows.get(seq)
        if rows is None:
            shape = (1, self.layout.num_kv_heads, seq, self.layout.head_dim)
            rows = [self.e.torch.empty(shape, dtype=self.kv_dtype, device="cuda") for _ in self.present_names]
            if seq == 1:
                self._rows[seq] = rows
        return rows

    @property
    def bytes_allocated(self) -> int:
        """The KV memory the runner owns: one buffer per tensor of `capacity` slots."""
        return sum(buf.numel() * buf.element_size() for buf in self._buffers)


class TrtBackend(Backend):
    name = "trt"

    def __init__(self):
        self.trt = require_tensorrt("backend 'trt'")
        import torch

        if not torch.cuda.is_available():
            from ..errors import BackendUnavailableError

            raise BackendUnavailableError("backend 'trt' needs a CUDA GPU visible to torch (a CUDA build of torch)")
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self._engines: dict | None = None

    def _engine_for(self, onnx_path: Path) -> _Engine:
        from ..engines.build import read_engines

        directory = Path(onnx_path).parent
        if self._engines is None:
            self._engines = read_engines(directory)["engines"]
            from ..export.manifest import load_manifest

            if load_manifest(directory, verify="none").get("target") == "trt":
                from .. import plugins

                plugins.load()  # the selector engine holds tops::Select
        part = Path(onnx_path).stem
        return _Engine(self.trt, self.runtime, directory / self._engines[part]["path"])

    def session(self, path):
        return TrtSession(self._engine_for(path))

    def decoder(self, path, layout):
        return TrtDecoderRunner(self._engine_for(path), layout)
