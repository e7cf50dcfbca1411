"""TensorRT optimization profiles from the manifest and a device preset: pure data, tested here.

Each part gets one profile: {input name: (min, opt, max)} shapes; `keep` is a shape tensor (its
value decides output shapes), so its entry gives values, not a shape. Ranges:
  images     1 (one image per call); LLaVA-NeXT crops 1 .. max_crops
  patches    Qwen-VL (dynamic resolution): the vision graph's patches min_tokens*4 .. max_patches and
             merged tokens min_tokens .. max_tokens (opt: half the cap), from the processor's pixel caps
  visual     N tokens per image (static in LLaVA-1.5's graphs); NeXT's selector segments 1 .. max_selectable
  prompt     1 .. MAX_PROMPT_TEXT_TOKENS text tokens (instruction, embed calls)
  prefill    1 .. min(N + MAX_PROMPT_TEXT_TOKENS, context) tokens in one decoder step (opt 1: decode dominates)
  KV cache   1 .. context slots (the fixed-size cache of a generation), context = min(preset, model)
"""

from __future__ import annotations

from .devices import DevicePreset
from .memory import MAX_PROMPT_TEXT_TOKENS

Range = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]
SHAPE_TENSORS = ("keep",)


def _dims(spec: dict, sizes: dict[str, Range]) -> Range:
    """(min, opt, max) of one IO spec: static dims stay, named dims come from `sizes`."""
    out = ([], [], [])
    for dim in spec["shape"]:
        for i in range(3):
            out[i].append(dim if isinstance(dim, int) else sizes[dim][i])
    return tuple(tuple(x) for x in out)


def optimization_profiles(manifest: dict, device: DevicePreset) -> dict[str, dict[str, Range]]:
    """{part: {input: (min, opt, max)}} for every part in the manifest."""
    visual = manifest["visual"]
    n = int(visual["max_tokens"])  # the longest visual sequence of one image
    selectable = int(visual["max_selectable"])
    per_crop = int(visual["tokens_per_crop"])
    crops = int(visual.get("max_crops", 1))
    context = min(device.max_context, int(manifest["decoder"]["max_context"]))
    prompt = MAX_PROMPT_TEXT_TOKENS
    prefill = min(n + prompt, context)  # no prompt is longer than the context
    sizes = {
        "num_images": (1, 1, 1), "batch": (1, 1, 1),
        "num_crops": (1, min(3, crops), crops), "tokens": (1, per_crop, selectable),
        "instruction": (1, 32, prompt),
        "queries": (1, 32, prompt),  # an in-LLM selector's text rows (the prompt after the image)
        "sequence": (1, 1, prefill),
        "cache_sequence": (1, context // 2, context),
        "past_sequence": (1, context // 2, context),  # the KV buffers (the ORT backend binds 0 slots at prefill)
    }
    if "max_patches" in visual:  # mrope: the vision graph's patch and token counts follow the image
        unit = int(visual["max_patches"]) // n
        low = int(visual.get("min_tokens", 1))
        opt = max(low, n // 2)
        sizes["num_tokens"] = (low, opt, n)
        sizes["num_patches"] = (low * unit, opt * unit, n * unit)
    profiles = {}
    for part, record in manifest["parts"].items():
        part_sizes = dict(sizes, sequence=(1, 32, prompt)) if part == "embed" else sizes
        profile = {}
        for spec in record["inputs"]:
            if spec["name"] in SHAPE_TENSORS:  # the value range of the budget K
                profile[spec["name"]] = ((1,), (min(selectable, 128),), (selectable,))
            else:
                profile[spec["name"]] = _dims(spec, part_sizes)
        profiles[part] = profile
    return profiles


def format_profiles(profiles: dict[str, dict[str, Range]]) -> str:
    lines = ["optimization profiles (min / opt / max):"]
    for part, profile in profiles.items():
        lines.append(f"  {part}")
        for name, (lo, opt, hi) in profile.items():
            kind = " (values)" if name in SHAPE_TENSORS else ""
            lines.append(f"    {name:<28}{lo} / {opt} / {hi}{kind}")
    return "\n".join(lines)
