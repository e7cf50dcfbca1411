"""What every model family's adapter provides, and the parts shared by all LLaVA-style models.

An adapter holds all model-specific knowledge: how to split the HF model into parts, the IO of each
part, where image tokens go and which config fields matter. Export, runtime and calibration read it
from here instead of branching on model names (cf. optimum's per-model OnnxConfig classes).
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name, dtype and shape (str entries are dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class PartSpec:
    """One exportable part: its IO, and either a torch module (traced with example inputs) or a
    builder of the ONNX model itself (the selectors, written directly in ONNX)."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    module: nn.Module | None = None
    example_inputs: Callable[[], tuple[torch.Tensor, ...]] | None = None
    onnx_model: Callable[[], Any] | None = None

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {
            spec.name: {i: d for i, d in enumerate(spec.shape) if isinstance(d, str)}
            for spec in [*self.inputs, *self.outputs]
        }


def config_sha256(config) -> str:
    """A stable hash of a HF config, so a manifest names exactly the architecture it came from."""
    data = config.to_dict()
    data.pop("_name_or_path", None)
    data.pop("transformers_version", None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def cache_argument(model: nn.Module) -> str:
    """The keyword a HF model's forward takes its KV cache by: `cache` from transformers 5.24 on
    (`past_key_values` is deprecated there and removed in 5.40), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class EmbedTokens(nn.Module):
    """input_ids -> inputs_embeds: the LLM's token-embedding lookup as a part of its own."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


#: the attention implementation the decoder graph is traced with (registered with transformers below)
EXPORT_ATTENTION = "tops_edge_export"
#: set on an attention module (a list) to collect its head-averaged probabilities (DecoderSegment)
CAPTURE = "_tops_edge_capture"


def additive_causal_mask(attention_mask: torch.Tensor, query_length: int, dtype=torch.float32) -> torch.Tensor:
    """[B, T] padding mask (1 = attend) -> [B, 1, S, T] additive mask (0 or the dtype's minimum) for
    the last S = query_length positions of T: causal over sequence index, padded keys masked.
    Built once per graph; HF's own mask builders trace into a subgraph per layer on some paths."""
    total = attention_mask.shape[-1]
    query_idx = torch.arange(query_length, device=attention_mask.device) + (total - query_length)
    return slot_causal_mask(attention_mask, query_idx, dtype)


def slot_causal_mask(attention_mask: torch.Tensor, cache_position: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The decoder graph's mask over a fixed-size cache: [B, C] slot mask (1 = the slot holds a
    token, this step's included) and [S] the slots the S new tokens are written to -> [B, 1, S, C]
    additive mask (0 or the dtype's minimum): query s sees the filled slots up to its own."""
    key_idx = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    allowed = (key_idx[None, :] <= cache_position[:, None])[None, None] & attention_mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))


def step_mask(attention_mask: torch.Tensor, attention_bias: torch.Tensor, cache_position: torch.Tensor,
              dtype=torch.float32) -> torch.Tensor:
    """[B, 1, S, S] additive mask of this step's S tokens over themselves (keys = the new rows):
    causal by slot, this step's slots' `attention_mask` and `attention_bias` entries."""
    filled = attention_mask[:, cache_position]  # [B, S]: which of this step's slots hold a token
    allowed = (cache_position[None, :] <= cache_position[:, None])[None, None] & filled[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    mask = torch.where(allowed, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    return mask + attention_bias[:, cache_position][:, None, None, :].to(dtype)


def past_and_step_mask(attention_mask: torch.Tensor, attention_bias: torch.Tensor, cache_position: torch.Tensor,
                       past_slots, dtype=torch.float32) -> torch.Tensor:
    """The decoder graph's additive mask [B, 1, S, P + S] over the keys grouped_attention sees: the
    P = `past_slots` cache slots the past buffers hold (C, or 0 for a step into an empty cache; only
    the past is unmasked: slots filled before this step, i.e. `attention_mask` set and below
    cache_position[0], since a step's slots are contiguous), then this step's S new keys (step_mask).
    `attention_bias` [B, C] is added per key slot (the new keys': gathered at cache_position).
    Built once per graph for all layers."""
    seq = cache_position.shape[0]
    slot = torch.arange(past_slots, device=attention_mask.device)
    past = attention_mask[:, :past_slots].bool() & (slot < cache_position[0])[None, :]  # [B, P]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    past = torch.where(past, zero, torch.tensor(torch.finfo(dtype).min, dtype=dtype))
    past = past + attention_bias[:, :past_slots].to(dtype)
    past = past[:, None, None, :].expand(-1, 1, seq, past_slots)
    return torch.cat([past, step_mask(attention_mask, attention_bias, cache_position, dtype)], dim=-1)


class CachedRows:
    """What the decoder graph's cache hands HF's attention as `key` (or `value`): the layer's past
    buffer [B, H, P, D] as given (never copied or written) and this step's new rows [B, H, S, D]
    (keys after rotary, or values), written by the runtime into slots `cache_position` after the step.
    A plain carrier: the tracer only sees the tensors, which grouped_attention reads."""

    __slots__ = ("past", "new", "cache_position", "past_slots", "capacity")

    def __init__(self, past: torch.Tensor, new: torch.Tensor, cache_position: torch.Tensor, past_slots, capacity):
        # read once per graph: P (the past buffers' slots: C, or 0 into an empty cache) and C
        self.past, self.new, self.cache_position = past, new, cache_position
        self.past_slots, self.capacity = past_slots, capacity


def _slot_cache(past, cache_position: torch.Tensor, capacity, num_layers: int, first_layer: int = 0):
    """A transformers cache over fixed-size [B, H, C, D] buffers (C = `capacity`; bound as 0 slots
    into an empty cache) that it only reads: each layer's update hands the attention its past
    buffer and this step's new keys / values together (CachedRows), and keeps the new rows as the
    graph's `present` ([B, H, S, D]). The graph writes no cache: the runtime copies present into its
    one buffer per tensor at the step's slots, so no KV buffer is ever copied (schema 6 wrote the
    slots with a ScatterND into a copy of the past, which needed a second buffer set to write into).
    HF's attention modules (Llama, Qwen2.5-VL, Qwen3-VL) pass update's results to the attention
    function untouched. A decoder segment holds layers first_layer.. of the model: `past` holds
    theirs only."""
    from transformers import DynamicCache

    past_slots = past[0].shape[2]

    class SlotCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            i = layer_idx - first_layer
            self.present[i] = (key_states, value_states)
            return (CachedRows(past[2 * i], key_states, cache_position, past_slots, capacity),
                    CachedRows(past[2 * i + 1], value_states, cache_position, past_slots, capacity))

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0  # unused: positions and the mask are given

    cache = SlotCache()
    cache.present = [None] * num_layers
    return cache


def grouped_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Attention with grouped KV heads that never copies the KV: the G query heads sharing a KV head
    are folded into the query length ([B, KVH, G*S, D] x [B, KVH, D, T]) instead of repeating K and V
    G times (HF's eager `repeat_kv` and the SDPA export both materialise [B, H, T, D] copies of every
    layer's cache at every decode step). Same arithmetic as HF's eager attention otherwise:
    softmax(q k^T * scale + mask) v in fp32, with `attention_mask` the additive [B, 1, S, T] mask.

    In the decoder graph `key` and `value` are CachedRows: the scores against the P past slots (C,
    or 0 into an empty cache) and against the S new keys are concatenated (T = P + S, masked by
    past_and_step_mask), one softmax runs over both, and the output is P_past V_past + P_new V_new,
    so the cache is read in place and never concatenated with the new rows (only the scores are).
    Plain tensors (the probe, the tests) are one key set."""
    batch, heads, seq, dim = query.shape
    rows = isinstance(key, CachedRows)
    kv_heads = (key.past if rows else key).shape[1]
    groups = heads // kv_heads
    q = (query * scaling).reshape(batch, kv_heads, groups * seq, dim)
    if rows:
        past_slots = key.past_slots
        scores = torch.cat([torch.matmul(q, key.past.transpose(2, 3)), torch.matmul(q, key.new.transpose(2, 3))],
                           dim=-1)  # [B, KVH, G*S, P + S]
    else:
        scores = torch.matmul(q, key.transpose(2, 3))  # [B, KVH, G*S, T]
    if attention_mask is not None:
        scores = (scores.reshape(batch, kv_heads, groups, seq, -1) + attention_mask[:, :, None]).reshape(
            batch, kv_heads, groups * seq, -1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    capture = getattr(module, CAPTURE, None)
    if capture is not None:  # a decoder segment's last layer: what an in-LLM selector reads
        mean = probs.reshape(batch, kv_heads * groups, seq, -1).float().mean(1)  # [B, S, T] over all heads
        if rows:  # to every cache slot [B, S, C]: the past's, then the new keys' at their slots
            slots = key.cache_position.view(1, 1, seq).expand(batch, seq, seq)
            empty = torch.zeros(batch, seq, key.capacity - past_slots, dtype=mean.dtype, device=mean.device)
            mean = torch.cat([mean[..., :past_slots], empty], dim=-1).scatter(-1, slots, mean[..., past_slots:])
        capture.append(mean)
    if rows:
        out = torch.matmul(probs[..., :past_slots], value.past) + torch.matmul(probs[..., past_slots:], value.new)
    else:
        out = torch.matmul(probs, value)  # [B, KVH, G*S, D]
    return out.reshape(batch, heads, seq, dim).transpose(1, 2), None


def _register_export_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(EXPORT_ATTENTION, grouped_attention)


class ChunkedLMHead(nn.Module):
    """An LM head computed as one MatMul per consecutive vocabulary slice, the logits concatenated in
    vocabulary order: every logit is the same dot product over the hidden size as in the one MatMul
    (tested equal), while no single GEMM spans the whole vocabulary. A TensorRT build gives each GEMM
    a workspace; a 150k-row head asks more of it than a Jetson Orin Nano's preset holds
    (plan/memory.py `lm_head_chunks`). The chunks are views of the head's own weight rows."""

    def __init__(self, head: nn.Linear, sizes: list[int]):
        super().__init__()
        if sum(sizes) != head.out_features or min(sizes) < 1:
            raise ValueError(f"vocabulary chunks {sizes} do not cover the head's {head.out_features} rows")
        self.sizes = list(sizes)
        self.chunks = nn.ModuleList()
        start = 0
        for n in sizes:
            chunk = nn.Linear(head.in_features, n, bias=head.bias is not None, device="meta")
            chunk.weight = nn.Parameter(head.weight.detach()[start:start + n], requires_grad=False)
            if head.bias is not None:
                chunk.bias = nn.Parameter(head.bias.detach()[start:start + n], requires_grad=False)
            self.chunks.append(chunk)
            start += n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk(x) for chunk in self.chunks], dim=-1)


class DecoderSegment(nn.Module):
    """Decoder layers [first, last) of the LLM over an explicit KV cache: the whole decoder when
    first = 0 and last = L, else one segment of a decoder cut at layers where tokens are pruned.

    The first segment takes `inputs_embeds`, a later one `hidden_states` (what the one before it
    handed on). The last segment applies the final norm and the LM head and returns the last
    position's logits: prefill never needs the others, and the lm_head over a 600-token prefill would
    be a large share of its cost at 7B. A segment that ends at a cut returns instead the hidden states
    after its last layer (`cut_hidden_states` [B, S, E], the next layer's input) and `cut_attention`
    [B, S, C]: its last layer's attention probabilities from each of the S query positions to the C
    cache slots (this step's own keys at their slots), averaged over heads, which in-LLM selectors
    read (text -> visual attention; computed inside that layer's attention, so every other layer
    keeps the plain kernel).

    The cache has a fixed size C for a whole generation (optimum's names, onnxruntime-genai's
    `past_present_share_buffer` shapes): `past_key_values.{i}.*` (i the model's layer index) are
    [B, H, C, D] buffers, `cache_position` [S] the slots this step's S tokens go to (contiguous, after
    the filled ones), `attention_mask` [B, C] which slots hold a token (this step's included), and
    `present.{i}.*` [B, H, S, D] only this step's new rows: the keys after rotary and the values. The
    graph reads the past in place and writes no cache: each layer's attention scores its queries
    against the past slots and against the S new keys (causal among them), one softmax over both
    (grouped_attention), and the runtime then copies present into its buffers at cache_position, so
    it holds one buffer per tensor. A step into an empty cache (a prefill) may bind the past as
    [B, H, 0, D]: nothing is scored against it (attention_mask, attention_bias and cut_attention
    keep their C slots), so a prefill's attention is S x S, not S x (C + S). Every decode step has
    the same shapes, so a runtime binds its buffers once per generation instead of once per token
    (16 KV bindings a token at 4 layers, most of the decode loop's time outside the graph). Empty
    slots are masked out; they must hold finite values (a runtime zeroes its buffers). Each segment
    has its own cache, mask, bias and positions: after a cut it caches only the tokens kept there.

    A segment built with `probe` (only where the selector at its cut reads `target_features`:
    TopV) also outputs `cut_target_features` [B, S, E]: the next layer's attention sub-block run on
    this step's whole sequence, h' = post_attention_layernorm(h + self_attn(input_layernorm(h))) of
    decoder layer `last` (HF's Llama-style decoder layer modules), i.e. what that layer's
    post-attention norm would see with nothing pruned at this cut. The next segment then runs layer
    `last` itself on the kept rows only, so that layer's KV cache holds only kept tokens: the probe
    writes no cache. Its attention spans this step's own tokens (causal, this step's mask and bias
    entries), which at prefill, from an empty cache, is the whole prompt; on decode steps it is a
    one-token attention whose output nobody reads (the cost of one attention sub-block per token in
    the segment that ends at the cut, paid only by exports that asked for the probe).

    `attention_bias` [B, C] is added to the logits of every query for key slot c (a new key: its slot
    in cache_position): 0 reproduces the HF model exactly; log(n) makes one cached token count as n
    identical ones (the runtime's token merging, see selector/merge.py).

    The layers are HF's own modules, called as the HF model calls them (rotary embeddings once, one
    additive mask for all layers), traced with `grouped_attention` (the HF model's attention setting
    is restored after each call): measured on tiny-llava-medium's decoder, the SDPA export spent more
    time copying the cache (repeat_kv, a transposed and a scaled copy of K per layer) than in the
    attention's matmuls.
    """

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, first: int, last: int, probe: bool = False):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.first, self.last = first, last
        self.num_layers = last - first
        self.returns_logits = last == len(language_model.layers)
        if probe and self.returns_logits:
            raise ValueError("a probe of the next layer needs a segment that ends at a cut")
        self.probe = probe

    def forward(self, hidden_states, attention_mask, position_ids, attention_bias, cache_position, *past):
        _register_export_attention()
        lm = self.language_model
        capacity = attention_mask.shape[-1]
        cache = _slot_cache(past, cache_position, capacity, self.num_layers, self.first)
        # per key slot, added to every layer's and head's attention logits: log(size) of a kept
        # token that stands for merged tokens (proportional attention), 0 elsewhere
        mask = past_and_step_mask(attention_mask, attention_bias, cache_position, past[0].shape[2],
                                  hidden_states.dtype)
        layers = lm.layers[self.first:self.last]
        captured: list = []
        if not self.returns_logits:
            setattr(layers[-1].self_attn, CAPTURE, captured)
        config = lm.config
        before = config._attn_implementation
        config._attn_implementation = EXPORT_ATTENTION
        try:
            rotary = lm.rotary_emb(hidden_states, position_ids=position_ids)
            h = hidden_states
            for index, layer in enumerate(layers, start=self.first):
                h = layer(h, attention_mask=mask, position_ids=position_ids, position_embeddings=rotary,
                          use_cache=True, **{cache_argument(layer): cache})
                h = self.after_layer(index, h)
            if self.probe:
                target = self._probe(lm.layers[self.last], h, attention_mask, attention_bias, cache_position,
                                     position_ids, rotary)
        finally:
            config._attn_implementation = before
            if hasattr(layers[-1].self_attn, CAPTURE):
                delattr(layers[-1].self_attn, CAPTURE)
        present = [t for kv in cache.present for t in kv]
        if self.returns_logits:
            return (self.lm_head(lm.norm(h[:, -1:, :])), *present)
        return (h, captured[0], *((target,) if self.probe else ()), *present)

    def after_layer(self, index: int, h: torch.Tensor) -> torch.Tensor:
        """The hidden states handed from decoder layer `index` to the next (a family may add to them:
        Qwen3-VL's DeepStack)."""
        return h

    @staticmethod
    def _probe(layer, h, attention_mask, attention_bias, cache_position, position_ids, rotary):
        """post_attention_layernorm(h + self_attn(input_layernorm(h))) of `layer` over this step's S
        tokens only (keys = queries, no cache): causal by slot, this step's slots' mask and bias."""
        mask = step_mask(attention_mask, attention_bias, cache_position, h.dtype)
        attended, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask,
                                      position_ids=position_ids, position_embeddings=rotary)
        return layer.post_attention_layernorm(h + attended)


class ModelAdapter(ABC):
    """Base class of the per-family adapters (llava, later llava_next)."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    #: substrings of the short aliases this family answers to, mapped to hub ids
    aliases: dict[str, str] = {}
    #: hub id -> billions of parameters of that published checkpoint (the size a first download says)
    hub_params_b: dict[str, float] = {}
    #: rows of the decoder's position_ids: 1 ([B, S], 1-D RoPE) or 3 ([3, B, S], Qwen-VL's M-RoPE)
    position_rows: int = 1

    def __init__(self, model: nn.Module, processor, source: str):
        self.model = model.eval()
        self.processor = processor
        self.source = source

    # --- loading ---------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def hf_model_class(cls): ...

    @classmethod
    @abstractmethod
    def build_tiny(cls, name: str, seed: int = 0) -> "ModelAdapter": ...

    @classmethod
    def load_processor(cls, path):
        """The processor of a saved model folder (HF's AutoProcessor unless a family needs otherwise)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(path))

    def check_positions(self, positions: str) -> None:
        """An InputError where `--positions` has no meaning for this family (every value is fine here)."""

    def cap_image_tokens(self, max_tokens: int) -> None:
        """`--max-image-tokens`: only families with dynamic resolution take it."""
        from ..errors import InputError

        raise InputError(f"--max-image-tokens applies to dynamic-resolution models (Qwen-VL); {self.family}'s "
                         "images have a fixed token count")

    def position_example(self, past_len: int, seq: int) -> torch.Tensor:
        """Example position_ids for tracing a decoder segment: [B, S], or [3, B, S] with M-RoPE."""
        return torch.arange(past_len, past_len + seq).unsqueeze(0)

    # --- facts the manifest records ------------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        return self.config.get_text_config(decoder=True)

    @property
    def num_layers(self) -> int:
        return self.text_config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        tc = self.text_config
        return getattr(tc, "num_key_value_heads", None) or tc.num_attention_heads

    @property
    def head_dim(self) -> int:
        tc = self.text_config
        return getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads

    @property
    def hidden_size(self) -> int:
        return self.text_config.hidden_size

    @property
    def max_context(self) -> int:
        return self.text_config.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = self.text_config.eos_token_id
        return [eos] if isinstance(eos, int) else list(eos or [])

    @abstractmethod
    def visual_layout(self) -> dict[str, Any]:
        """Visual tokens per image, their grid and the image token id."""

    @abstractmethod
    def parts(self, cls_attention: bool = False, cuts=(), probes=()) -> list[PartSpec]:
        """The exportable parts, in pipeline order (vision, embed, the decoder or its segments). The
        vision part outputs image_features and vision_features, plus cls_attention when asked (the
        attention selector); `cuts` splits the decoder before those layers, and the segment before
        each cut in `probes` also outputs the next layer's post-attention states (decoder_parts)."""

    def check_cuts(self, cuts) -> tuple[int, ...]:
        """`--cuts`: decoder layers 1..L-1, ascending, each once; anything else is an InputError."""
        from ..errors import InputError

        cuts = tuple(cuts or ())
        n = self.num_layers
        for c in cuts:
            if isinstance(c, bool) or not isinstance(c, int):
                raise InputError(f"--cuts takes decoder layer numbers, got {c!r}")
            if not 1 <= c <= n - 1:
                raise InputError(f"--cuts {c} is out of range: this model's decoder has {n} layers, so a cut "
                                 f"sits before a layer 1..{n - 1}")
        if list(cuts) != sorted(set(cuts)):
            raise InputError(f"--cuts must be ascending without repeats, got {','.join(map(str, cuts))}")
        return cuts

    def decoder_parts(self, language_model: nn.Module, lm_head: nn.Module, cuts=(), probes=()) -> list[PartSpec]:
        """The KV-cached decoder, cut before each layer in `cuts` into segments (`decoder` when
        uncut, else `decoder.0`, `decoder.1`, ...); shared by every family whose LLM is HF-causal-LM
        shaped. The segment ending at each cut in `probes` (a subset of `cuts`) also outputs
        `cut_target_features`. See DecoderSegment for the IO."""
        cuts = self.check_cuts(cuts)
        if not set(probes) <= set(cuts):
            raise ValueError(f"probes {sorted(set(probes) - set(cuts))} are not among the cuts {list(cuts)}")
        bounds = [0, *cuts, self.num_layers]
        parts = []
        for index, (first, last) in enumerate(zip(bounds, bounds[1:])):
            name = "decoder" if len(bounds) == 2 else f"decoder.{index}"
            segment = DecoderSegment(language_model, lm_head, first, last, probe=last in probes)
            parts.append(self._segment_part(name, segment))
        return parts

    def _segment_part(self, name: str, segment: DecoderSegment) -> PartSpec:
        h, d, e = self.num_kv_heads, self.head_dim, self.hidden_size
        layers = range(segment.first, segment.last)
        past_names = [f"past_key_values.{i}.{kind}" for i in layers for kind in ("key", "value")]
        present_names = [f"present.{i}.{kind}" for i in layers for kind in ("key", "value")]
        kv = lambda names, length: [TensorSpec(nm, "float32", ("batch", h, length, d)) for nm in names]  # noqa: E731
        first_input = "inputs_embeds" if segment.first == 0 else "hidden_states"
        if segment.returns_logits:
            outputs = [TensorSpec("logits", "float32", ("batch", 1, self.text_config.vocab_size))]
        else:
            outputs = [TensorSpec("cut_hidden_states", "float32", ("batch", "sequence", e)),
                       TensorSpec("cut_attention", "float32", ("batch", "sequence", "cache_sequence"))]
            if segment.probe:
                outputs.append(TensorSpec("cut_target_features", "float32", ("batch", "sequence", e)))

        def example():
            past_len, seq, capacity = 3, 5, 11
            past = [torch.randn(1, h, capacity, d) for _ in past_names]
            filled = torch.zeros(1, capacity, dtype=torch.int64)
            filled[:, : past_len + seq] = 1
            return (
                torch.randn(1, seq, e),
                filled,
                self.position_example(past_len, seq),
                torch.zeros(1, capacity),
                torch.arange(past_len, past_len + seq),
                *past,
            )

        return PartSpec(
            name=name,
            module=segment,
            inputs=[
                TensorSpec(first_input, "float32", ("batch", "sequence", e)),
                TensorSpec("attention_mask", "int64", ("batch", "cache_sequence")),
                TensorSpec("position_ids", "int64", (3, "batch", "sequence") if self.position_rows == 3
                           else ("batch", "sequence")),
                TensorSpec("attention_bias", "float32", ("batch", "cache_sequence")),
                TensorSpec("cache_position", "int64", ("sequence",)),
                # its own dim name: a prefill into an empty cache binds the past as 0 slots (the mask keeps C)
                *kv(past_names, "past_sequence"),
            ],
            outputs=[*outputs, *kv(present_names, "sequence")],  # this step's rows only
            example_inputs=example,
        )

    def embed_part(self, embedding: nn.Embedding) -> PartSpec:
        return PartSpec(
            name="embed",
            module=EmbedTokens(embedding),
            inputs=[TensorSpec("input_ids", "int64", ("batch", "sequence"))],
            outputs=[TensorSpec("inputs_embeds", "float32", ("batch", "sequence", self.hidden_size))],
            example_inputs=lambda: (torch.tensor([[1, 2, 3]], dtype=torch.int64),),
        )

    def layout_arrays(self) -> dict[str, Any]:
        """Arrays the runtime's visual layout needs beside the graphs (name -> numpy array), e.g.
        LLaVA-NeXT's learned image_newline vector. Saved as NAME.npy and hashed in the manifest."""
        return {}

    def save_preprocessing(self, out_dir) -> None:
        """Tokenizer, image processor and chat template, in HF format, beside the graphs."""
        self.processor.save_pretrained(str(out_dir))
