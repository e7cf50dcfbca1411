"""HF transformers references, computed with HF's own code paths (never our wrappers)."""

from __future__ import annotations

import torch

from tops_edge.models.base import cache_argument


def chat_text(processor, prompt: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.no_grad()
def hf_generate(model, processor, image, prompt: str, max_new_tokens: int) -> list[int]:
    """`LlavaForConditionalGeneration.generate` on the processor's output: greedy new token ids."""
    inputs = processor(images=image, text=chat_text(processor, prompt), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@torch.no_grad()
def hf_image_sequence(model, processor, image) -> torch.Tensor:
    """[T, D]: the image's visual tokens as HF's `get_image_features` lays them out (LLaVA-NeXT:
    base view, stitched and unpadded crops, row newlines)."""
    cfg = model.config
    inputs = processor.image_processor(images=image, return_tensors="pt")  # + image_sizes for NeXT
    return model.model.get_image_features(
        **inputs,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    ).pooler_output[0]


@torch.no_grad()
def hf_pruned_inputs_embeds(model, processor, image, prompt: str, kept: list[int]) -> torch.Tensor:
    """The prompt's embeddings with HF's image features at `kept` spliced into the image slot."""
    cfg = model.config
    ids = processor.tokenizer(chat_text(processor, prompt), return_tensors="pt").input_ids
    feats = hf_image_sequence(model, processor, image)
    slot = int((ids[0] == cfg.image_token_id).nonzero()[0, 0])
    text = model.get_input_embeddings()(ids)
    return torch.cat([text[:, :slot], feats[kept].unsqueeze(0), text[:, slot + 1 :]], dim=1)


@torch.no_grad()
def hf_generate_from_embeds(model, inputs_embeds: torch.Tensor, max_new_tokens: int) -> list[int]:
    """HF generate fed the given inputs_embeds (positions 0..L-1: the compact convention)."""
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
    out = model.generate(inputs_embeds=inputs_embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0].tolist()


@torch.no_grad()
def hf_greedy_with_positions(model, inputs_embeds: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                             eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with HF's forward and cache, fed explicit position ids (the `original`
    convention); each new token takes the position after the previous one."""
    return hf_greedy_with_bias(model, inputs_embeds, None, max_new_tokens, positions, eos_token_id)


@torch.no_grad()
def merged_reference(features: torch.Tensor, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The documented merge rule, written independently of tops_edge: each dropped token joins the
    kept token of highest cosine similarity, a kept token is the mean of its group, -> (merged [K, D],
    group sizes [K])."""
    kept_t = torch.tensor(kept)
    unit = torch.nn.functional.normalize(features.float(), dim=-1)
    owner = (unit @ unit[kept_t].T).argmax(dim=1)
    owner[kept_t] = torch.arange(len(kept))
    sizes = torch.bincount(owner, minlength=len(kept))
    sums = torch.zeros(len(kept), features.shape[1]).index_add_(0, owner, features.float())
    return sums / sizes[:, None], sizes


@torch.no_grad()
def hf_merged_inputs(model, processor, image, prompt: str, kept: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs_embeds, attention bias [L]) of the prompt with the merged image features at `kept`
    (a LLaVA-1.5 image: one selection group) and log(group size) on those positions."""
    cfg = model.config
    ids = processor.tokenizer(chat_text(processor, prompt), return_tensors="pt").input_ids
    merged, sizes = merged_reference(hf_image_sequence(model, processor, image), kept)
    slot = int((ids[0] == cfg.image_token_id).nonzero()[0, 0])
    text = model.get_input_embeddings()(ids)
    embeds = torch.cat([text[:, :slot], merged.unsqueeze(0), text[:, slot + 1 :]], dim=1)
    bias = torch.zeros(embeds.shape[1])
    bias[slot : slot + len(kept)] = torch.log(sizes.float())
    return embeds, bias


@torch.no_grad()
def hf_greedy_with_bias(model, inputs_embeds: torch.Tensor, bias: torch.Tensor | None, max_new_tokens: int,
                        positions: torch.Tensor | None = None, eos_token_id: int | None = None) -> list[int]:
    """Greedy decoding with HF's forward and cache. With `bias` [L], fed a 4D additive mask: causal,
    plus the bias on the prompt's key positions (0 on every new token); HF uses a prepared 4D mask as
    given. Without, HF builds its own causal mask."""
    from transformers import DynamicCache

    length = inputs_embeds.shape[1]
    positions = torch.arange(length) if positions is None else positions
    mask = None
    if bias is not None:
        causal = torch.triu(torch.full((length, length), torch.finfo(torch.float32).min), diagonal=1)
        mask = (causal + bias[None, :])[None, None]
    cache = DynamicCache()
    with_cache = {cache_argument(model): cache}
    logits = model(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=positions[None],
                   use_cache=True, **with_cache).logits
    keys_bias, next_pos = bias, int(positions[-1]) + 1
    out: list[int] = []
    for _ in range(max_new_tokens):
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        if tok == eos_token_id:
            break
        emb = model.get_input_embeddings()(torch.tensor([[tok]]))
        if keys_bias is not None:
            keys_bias = torch.cat([keys_bias, torch.zeros(1)])
        logits = model(inputs_embeds=emb, attention_mask=None if keys_bias is None else keys_bias[None, None, None, :],
                       position_ids=torch.tensor([[next_pos]]), use_cache=True, **with_cache).logits
        next_pos += 1
    return out


@torch.no_grad()
def hf_cut_greedy(model, inputs_embeds: torch.Tensor, bias: torch.Tensor, cuts, keep_rows, max_new_tokens: int,
                  positions: str = "compact", eos_token_id: int | None = None, deepstack: torch.Tensor | None = None):
    """Greedy decoding through HF's own decoder layers (eager attention), the prompt cut before each
    layer in `cuts`: at cut j the rows `keep_rows[j]` of the previous segment's sequence go on (all
    of them when None). Every segment caches only its own rows and numbers them by `positions`:
    `compact` 0..n-1 within the segment, `original` the rows' positions in the uncut prompt; new
    tokens follow each segment's last position. `positions` may also be the uncut prompt's position
    ids themselves ([L], or M-RoPE's [3, L]: kept rows keep theirs, as `original`; new tokens take
    the segment's largest position + 1 on every row). `bias` [L] is added to every attention logit on the
    prompt's key positions (0 on new tokens). Returns (new token ids, [the first step's logits],
    {cut: head-averaged attention [S, S] of the layer before it, on that segment's prompt}). With
    `deepstack` [L_ds, L, D] (Qwen3-VL: zeros on text rows), decoder layer i < L_ds's output on the
    prompt gets row i added on the rows still there, as HF's `_deepstack_process` adds it at the image
    positions (decode steps add nothing, as in HF)."""
    from transformers import DynamicCache

    lm = model.model.language_model
    before = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation("eager")
    bounds = [0, *cuts, len(lm.layers)]
    captured: dict = {}
    def keep_first(c):  # the prefill's probabilities; a hook that returns None leaves the output alone
        def hook(module, args, out):
            captured.setdefault(c, out[1][0].mean(0))
        return hook

    hooks = [lm.layers[c - 1].self_attn.register_forward_hook(keep_first(c)) for c in cuts]
    try:
        cache = DynamicCache()  # one per layer index: each segment's layers hold only its rows
        given = isinstance(positions, torch.Tensor)
        h, key_bias, ds = inputs_embeds, bias, deepstack
        pos = positions if given else torch.arange(inputs_embeds.shape[1])
        lengths, next_pos, biases = [], [], []
        for s, (first, last) in enumerate(zip(bounds, bounds[1:])):
            if s > 0 and keep_rows[s - 1] is not None:
                rows = torch.as_tensor(keep_rows[s - 1])
                h, pos, key_bias = h[:, rows], pos[..., rows], key_bias[rows]
                ds = None if ds is None else ds[:, rows]
            seg_pos = torch.arange(h.shape[1]) if not given and positions == "compact" else pos
            length = h.shape[1]
            causal = torch.triu(torch.full((length, length), torch.finfo(torch.float32).min), diagonal=1)
            h = _hf_layers(lm, h, (causal + key_bias[None, :])[None, None], seg_pos, cache, first, last, ds)
            lengths.append(length)
            next_pos.append(int(seg_pos[..., -1].max()) + 1)
            biases.append(key_bias)
        logits = model.lm_head(lm.norm(h[:, -1:]))[0, -1]
        first_logits, out = logits, []
        for step in range(max_new_tokens):
            tok = int(logits.argmax())
            out.append(tok)
            if tok == eos_token_id or step + 1 == max_new_tokens:
                break
            h = model.get_input_embeddings()(torch.tensor([[tok]]))
            for s, (first, last) in enumerate(zip(bounds, bounds[1:])):
                biases[s] = torch.cat([biases[s], torch.zeros(1)])
                step_pos = torch.full((*pos.shape[:-1], 1), next_pos[s] + step)  # [1] or [3, 1]
                h = _hf_layers(lm, h, biases[s][None, None, None, :], step_pos, cache, first, last)
            logits = model.lm_head(lm.norm(h[:, -1:]))[0, -1]
    finally:
        for hook in hooks:
            hook.remove()
        model.set_attn_implementation(before)
    return out, first_logits, captured


def _hf_layers(lm, h, mask, positions, cache, first: int, last: int, deepstack=None):
    """HF's decoder layers first..last-1 on h, called as LlamaModel.forward (or Qwen2.5-VL's text
    model, with positions [3, S]) calls them."""
    batched = positions[None] if positions.dim() == 1 else positions[:, None]  # [1, S] or [3, 1, S]
    rotary = lm.rotary_emb(h, position_ids=batched)
    for index, layer in enumerate(lm.layers[first:last], start=first):
        h = layer(h, attention_mask=mask, position_ids=batched, position_embeddings=rotary, use_cache=True,
                  **{cache_argument(layer): cache})
        if deepstack is not None and index < len(deepstack):
            h = h + deepstack[index][None]
    return h


@torch.no_grad()
def hf_layer_probe(model, inputs_embeds: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, t) on the whole prompt: h [1, L, D] the hidden states entering decoder layer `layer`
    (HF's forward, `output_hidden_states`), t [1, L, D] = post_attention_layernorm(h +
    self_attn(input_layernorm(h))) of that layer, run here with HF's own modules (eager attention,
    causal mask, positions 0..L-1): TopV's sources and targets at that layer."""
    lm = model.model.language_model
    before = model.config.get_text_config(decoder=True)._attn_implementation
    model.set_attn_implementation("eager")
    try:
        h = lm(inputs_embeds=inputs_embeds, output_hidden_states=True).hidden_states[layer]
        length = h.shape[1]
        positions = torch.arange(length)[None]
        mask = torch.triu(torch.full((length, length), torch.finfo(torch.float32).min), diagonal=1)[None, None]
        block = lm.layers[layer]
        attended, _ = block.self_attn(hidden_states=block.input_layernorm(h), attention_mask=mask,
                                      position_embeddings=lm.rotary_emb(h, position_ids=positions),
                                      position_ids=positions)
        return h, block.post_attention_layernorm(h + attended)
    finally:
        model.set_attn_implementation(before)
