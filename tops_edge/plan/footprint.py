"""What a model holds, counted once: parameters per exported part (split into matmul weights, which
INT8 quantizes, and the rest) and the decoder's shape. The planner needs nothing else.

From an adapter, the counts are exact for what the exported graphs contain: the vision part counts
only the modules its forward runs (LLaVA-1.5's feature layer -2 never runs the tower's last layer),
found by running it once on its example inputs, on the model's own device (the meta device when only
a config is known; nothing is computed there).
An export records this in its manifest (`footprint`) so that `tops-build` plans without the model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ManifestError


@dataclass(frozen=True)
class Footprint:
    vision_matmul: int  # nn.Linear weights of the vision tower and projector
    vision_other: int  # biases, norms, patch conv, position embeddings
    embed: int  # the token-embedding table (a Gather: never quantized)
    decoder_matmul: int  # the LLM's nn.Linear weights and lm_head
    decoder_other: int  # norms
    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_context: int
    tokens_per_image: int  # the most visual tokens one image can have (LLaVA-NeXT: all crops, newlines)

    @property
    def parameters(self) -> int:
        return self.vision_matmul + self.vision_other + self.embed + self.decoder_matmul + self.decoder_other

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Footprint":
        try:
            return cls(**{f.name: int(data[f.name]) for f in fields(cls)})
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(f"the manifest's 'footprint' is incomplete ({exc}); re-export with tops-export") from None


def _split(params_by_module) -> tuple[int, int]:
    """(matmul weights, everything else) over (module, its own parameters) pairs."""
    from torch import nn

    matmul = other = 0
    for module, params in params_by_module:
        for name, p in params:
            if isinstance(module, nn.Linear) and name == "weight":
                matmul += p.numel()
            else:
                other += p.numel()
    return matmul, other


def _vision_modules_run(vision_part) -> list:
    """The submodules of the vision part's module that its forward calls on its example inputs (or
    zeros of its declared shapes); every submodule if that forward cannot run (an upper bound)."""
    import torch

    module = vision_part.module
    device = next(module.parameters()).device
    if vision_part.example_inputs is not None:
        inputs = [x.to(device) for x in vision_part.example_inputs()]
    else:
        dtypes = {"float32": torch.float32, "int64": torch.int64}
        inputs = [torch.zeros([1 if isinstance(d, str) else d for d in spec.shape], dtype=dtypes.get(spec.dtype, torch.float32),
                              device=device) for spec in vision_part.inputs]
    ran: dict[int, Any] = {}

    def seen(mod, args, out):  # returns None: a hook's return value would replace the output
        ran[id(mod)] = mod

    hooks = [m.register_forward_hook(seen) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*inputs)
    except Exception:  # a family whose vision forward needs more than this: count everything
        return list(module.modules())
    finally:
        for h in hooks:
            h.remove()
    return list(ran.values())


def footprint_of(adapter) -> Footprint:
    """The footprint of an adapter's model (real weights or the meta device)."""
    parts = adapter.parts()
    vision = next(p for p in parts if p.name == "vision")
    ran = _vision_modules_run(vision)
    vision_matmul, vision_other = _split((m, m.named_parameters(recurse=False)) for m in ran)
    lm = adapter.model.model.language_model
    embedding = lm.get_input_embeddings()
    decoder_modules = [m for m in lm.modules() if m is not embedding] + [adapter.model.lm_head]
    decoder_matmul, decoder_other = _split((m, m.named_parameters(recurse=False)) for m in decoder_modules)
    tc = adapter.text_config
    return Footprint(
        vision_matmul=vision_matmul, vision_other=vision_other, embed=embedding.weight.numel(),
        decoder_matmul=decoder_matmul, decoder_other=decoder_other,
        num_layers=adapter.num_layers, num_kv_heads=adapter.num_kv_heads, head_dim=adapter.head_dim,
        hidden_size=adapter.hidden_size, intermediate_size=tc.intermediate_size, vocab_size=tc.vocab_size,
        max_context=adapter.max_context, tokens_per_image=adapter.visual_layout()["max_tokens"],
    )


def with_probes(footprint: Footprint, adapter, probes) -> Footprint:
    """The footprint of an export whose segments before the cuts `probes` also run the next layer's
    attention sub-block (topv's probe, models/base.py): each such segment's graph holds a copy of that
    layer's input norm, attention projections and post-attention norm."""
    from dataclasses import replace

    if not probes:
        return footprint
    layers = adapter.model.model.language_model.layers
    modules = []
    for c in probes:
        layer = layers[c]
        modules += [*layer.self_attn.modules(), layer.input_layernorm, layer.post_attention_layernorm]
    matmul, other = _split((m, m.named_parameters(recurse=False)) for m in modules)
    return replace(footprint, decoder_matmul=footprint.decoder_matmul + matmul,
                   decoder_other=footprint.decoder_other + other)


def footprint_from_manifest(manifest: dict) -> Footprint:
    if "footprint" not in manifest:
        raise ManifestError("this export has no 'footprint' in its manifest (made by an older tops-export); re-export it")
    return Footprint.from_json(manifest["footprint"])
