"""The decoder exported in segments (`--cuts`), pruned inside the LLM: the exported pipeline against HF's
own decoder layers cut at the same layers with the same kept sets (compact and original positions),
cuts without pruning against HF generate, the per-segment KV formula, and the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import EXAMPLE, count_bindings, one_line_error
from hf_reference import chat_text, hf_cut_greedy, hf_generate, hf_merged_inputs, hf_pruned_inputs_embeds
from tops_edge.export import export_model
from tops_edge.models.tiny import build_tiny_llava
from tops_edge.runtime import Pipeline

NEW_TOKENS = 12
PROMPT = "What shapes are in the picture?"


@pytest.fixture(scope="module", params=["compact", "original"])
def fastv_dir(request, tmp_path_factory, deep):
    out = tmp_path_factory.mktemp("fastv") / request.param
    return export_model(deep, out, selector="fastv", keep=300, cuts=[2, 4], positions=request.param, progress=False)


def _prompt_rows(deep, prompt):
    ids = deep.processor.tokenizer(chat_text(deep.processor, prompt)).input_ids
    slot = ids.index(deep.config.image_token_id)
    return slot, len(ids) - slot - 1


def _keep_rows(stages, slot: int, after: int, num_visual: int, alive=None):
    """The reference's rows per cut from the pipeline's reported stages (visual-sequence indices),
    starting from the visual tokens `alive` in the prompt (default: all of them)."""
    alive = list(range(num_visual)) if alive is None else list(alive)
    rows = []
    for stage in stages:
        kept = stage["kept_indices"]
        visual = [slot + alive.index(k) for k in kept]
        rows.append(list(range(slot)) + visual + list(range(slot + len(alive), slot + len(alive) + after)))
        alive = kept
    return rows


def test_segmented_export_writes_one_graph_per_segment(fastv_dir):
    manifest = json.loads((fastv_dir / "manifest.json").read_text())
    dec = manifest["decoder"]
    assert dec["cuts"] == [2, 4]
    assert dec["segments"] == [{"part": "decoder.0", "layers": [0, 2]}, {"part": "decoder.1", "layers": [2, 4]},
                               {"part": "decoder.2", "layers": [4, 6]}]
    parts = manifest["parts"]
    first, middle, last = (parts[f"decoder.{i}"] for i in range(3))
    assert first["inputs"][0]["name"] == "inputs_embeds" and middle["inputs"][0]["name"] == "hidden_states"
    assert [o["name"] for o in middle["outputs"][:2]] == ["cut_hidden_states", "cut_attention"]
    assert last["outputs"][0]["name"] == "logits"
    assert [s["name"] for s in middle["inputs"] if s["name"].startswith("past")] == [
        "past_key_values.2.key", "past_key_values.2.value", "past_key_values.3.key", "past_key_values.3.value"]
    assert manifest["selector"]["stage"] == "llm"


def test_pruned_inside_the_llm_equals_hf_layers_cut_at_the_same_layers(fastv_dir, deep, image):
    """fastv prunes at layer 2 only (the plan's one cut); the cut at 4 passes every token on. The
    greedy tokens equal HF's decoder layers fed the same kept rows, the first logits within 1e-4,
    and the kept set is fastv's own choice on HF's attention at layer 1."""
    from tops_edge import selector

    pipe = Pipeline.load(fastv_dir)
    r = pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert [s["layer"] for s in r.stages] == [2] and r.stages[0]["keep"] == len(r.stages[0]["kept_indices"])
    slot, after = _prompt_rows(deep, PROMPT)
    embeds, bias = hf_merged_inputs(deep.model, deep.processor, image, PROMPT, list(range(576)))
    rows = _keep_rows(r.stages, slot, after, 576)
    ref, logits, attention = hf_cut_greedy(deep.model, embeds, bias, [2, 4], [rows[0], None], NEW_TOKENS,
                                           positions=pipe.positions, eos_token_id=deep.eos_token_ids[0])
    assert len(r.token_ids) >= 8 and r.token_ids == ref
    np.testing.assert_allclose(r.logits[0], logits.numpy(), atol=1e-4)
    # the selection itself: fastv's reference on HF's layer-1 attention from the text after the image
    text_attention = attention[2][slot + 576:, slot:slot + 576][None]
    info = selector.get("fastv")
    chosen = info.reference({"image_features": torch.zeros(1, 576, 1), "text_attention": text_attention},
                            r.stages[0]["keep"], info.resolve_params({}), (24, 24))
    assert chosen[0].tolist() == r.stages[0]["kept_indices"]


def _assert_equals_hf_layers(pipe, model, processor, image, prompt, eos):
    """The pipeline's greedy tokens and first logits against HF's layers cut at the export's cuts,
    fed the pipeline's reported kept sets (every visual token enters the LLM: in-LLM plans)."""
    r = pipe.generate(image, prompt, max_new_tokens=NEW_TOKENS, output_logits=True)
    assert r.stages and all(s["layer"] > 0 for s in r.stages)
    ids = processor.tokenizer(chat_text(processor, prompt)).input_ids
    slot = ids.index(model.config.image_token_id)
    after = len(ids) - slot - 1
    embeds = hf_pruned_inputs_embeds(model, processor, image, prompt, list(range(r.num_visual_tokens)))
    rows = _keep_rows(r.stages, slot, after, r.num_visual_tokens)
    by_cut = dict(zip([s["layer"] for s in r.stages], rows))
    ref, logits, _ = hf_cut_greedy(model, embeds, torch.zeros(embeds.shape[1]), list(pipe.cuts),
                                   [by_cut.get(c) for c in pipe.cuts], NEW_TOKENS, positions=pipe.positions,
                                   eos_token_id=eos)
    assert r.token_ids == ref
    np.testing.assert_allclose(r.logits[0], logits.numpy(), atol=1e-4)
    return r


def test_pdrop_on_a_saved_checkpoint_with_another_config_equals_hf_layers(tmp_path, image):
    """A LLaVA-1.5 saved to a directory, unlike the built-in: 224px/16 (196 tokens), MHA, 8 layers;
    pdrop prunes at three cuts (the quarters of its depth), each on the previous one's survivors."""
    model, processor = build_tiny_llava(
        seed=13, vision=dict(image_size=224, patch_size=16),
        text=dict(hidden_size=96, intermediate_size=160, num_hidden_layers=8, num_attention_heads=6,
                  num_key_value_heads=6))
    processor.image_processor.size = {"shortest_edge": 224}
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    out = export_model(str(ckpt), tmp_path / "pdrop", selector="pdrop", keep=100, progress=False)
    pipe = Pipeline.load(out)
    assert pipe.cuts == (2, 4, 6) and pipe.max_selectable == 196
    reloaded = type(model).from_pretrained(ckpt).eval()
    r = _assert_equals_hf_layers(pipe, reloaded, processor, image, PROMPT, reloaded.config.text_config.eos_token_id)
    assert [s["layer"] for s in r.stages] == [2, 4, 6]
    keeps = [s["keep"] for s in r.stages]
    assert keeps == sorted(keeps, reverse=True) and keeps[-1] < 196
    for earlier, later in zip(r.stages, r.stages[1:]):  # each stage picks among the previous one's survivors
        assert set(later["kept_indices"]) < set(earlier["kept_indices"])


def test_llava_next_pruned_inside_the_llm_keeps_the_newlines_and_equals_hf_layers(tmp_path):
    from PIL import Image

    model, processor = build_tiny_llava(seed=17, next_config=True,
                                        text=dict(num_hidden_layers=4, max_position_embeddings=4096))
    from tops_edge.models.llava_next import LlavaNextAdapter

    adapter = LlavaNextAdapter(model, processor, source="tiny-next-4")
    out = export_model(adapter, tmp_path / "next", selector="fastv", keep=900, progress=False)
    pipe = Pipeline.load(out)
    wide = Image.open(EXAMPLE).convert("RGB").resize((600, 300))
    token_map = pipe.layout.token_map((300, 600))
    r = _assert_equals_hf_layers(pipe, model, processor, wide, PROMPT, adapter.eos_token_ids[0])
    kept = set(r.stages[0]["kept_indices"])
    assert set(token_map.newlines.tolist()) <= kept
    assert r.stages[0]["keep"] == len(kept) - len(token_map.newlines) < token_map.selectable


def test_kv_cache_bytes_are_the_per_segment_sum(fastv_dir, deep, image):
    pipe = Pipeline.load(fastv_dir)
    r = pipe.generate(image, PROMPT, max_new_tokens=4, ignore_eos=True)
    slot, after = _prompt_rows(deep, PROMPT)
    per_token_layer = 2 * deep.num_kv_heads * deep.head_dim * 4  # K and V, fp32
    kept = r.stages[0]["keep"]
    held = [slot + 576 + after + 3, slot + kept + after + 3, slot + kept + after + 3]  # 3 fed-back tokens
    assert r.kv_cache_bytes == sum(2 * n * per_token_layer for n in held)  # 2 layers per segment
    unpruned = 6 * (slot + 576 + after + 3) * per_token_layer
    assert r.kv_cache_bytes / unpruned == pytest.approx((2 * 576 + 4 * kept + 6 * (slot + after + 3))
                                                        / (6 * (576 + slot + after + 3)))


def test_cuts_without_pruning_equal_hf_generate(tmp_path, deep, image):
    out = export_model(deep, tmp_path / "cut", selector="none", cuts=[1, 3, 5], progress=False)
    r = Pipeline.load(out).generate(image, PROMPT, max_new_tokens=NEW_TOKENS)
    assert r.stages == []
    assert r.token_ids == hf_generate(deep.model, deep.processor, image, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("cuts, message", [
    ("0", "out of range"), ("6", "out of range"), ("3,1", "ascending"), ("2,2", "ascending"), ("a", "--cuts"),
])
def test_bad_cuts_fail_in_one_line_and_write_nothing(tmp_path, capsys, cuts, message):
    from tops_edge.cli import export_main

    out = tmp_path / "out"
    code = export_main(["--model", "tiny-llava-medium", "--out", str(out), "--cuts", cuts])
    assert message in one_line_error(capsys, code)
    assert not out.exists()


def test_a_plan_at_a_layer_the_export_did_not_cut_is_refused(tmp_path, deep, image):
    from tops_edge.errors import InputError

    out = export_model(deep, tmp_path / "cut4", selector="fastv", keep=300, cuts=[4], progress=False)
    with pytest.raises(InputError, match="layer 2, which this export's decoder was not cut at"):
        Pipeline.load(out).generate(image, PROMPT, max_new_tokens=1)


def test_one_export_serves_pre_and_in_llm_selectors_in_tops_eval(tmp_path, deep, capsys):
    """A --cuts superset: fastv (cut 2) and pdrop (cuts 2, 3, 5) prune inside the LLM, uniform
    before it, all at the same equivalent T, switched at run time; tops-run --json lists the stages."""
    from tops_edge.cli import eval_main, run_main

    out = export_model(deep, tmp_path / "all", selector="fastv", keep=300, cuts=[2, 3, 5], progress=False)
    report = tmp_path / "eval.json"
    assert eval_main([str(out), "--limit", "3", "--keep", "300", "--selector", "fastv,pdrop,uniform",
                      "--types", "count", "--max-new-tokens", "2", "--json", str(report), "--quiet"]) == 0
    table = json.loads(report.read_text())["table"]
    capsys.readouterr()
    assert {name: table[name]["300"]["all"]["n"] for name in ("fastv", "pdrop", "uniform")} == \
        {"fastv": 3, "pdrop": 3, "uniform": 3}
    assert run_main([str(out), "--image", str(EXAMPLE), "--prompt", PROMPT, "--max-new-tokens", "2", "--json"]) == 0
    stages = json.loads(capsys.readouterr().out)["stages"]
    assert [(s["layer"], s["keep"], len(s["kept_indices"])) for s in stages] == [(2, 162, 162)]


def test_tops_bench_times_pre_and_in_llm_plans_side_by_side(fastv_dir):
    from tops_edge.bench import run_benchmark, validate

    report = run_benchmark(fastv_dir, keeps=[300], runs=1, warmup=0, new_tokens=3, selectors=["uniform", "fastv"])
    validate(report)
    uniform, fastv = report["budgets"]
    assert (uniform["selector"], fastv["selector"]) == ("uniform", "fastv")
    assert uniform["stages"] == [{"layer": 0, "keep": 300}] and fastv["stages"] == [{"layer": 2, "keep": 162}]
    for entry in (uniform, fastv):
        assert len(entry["segment_prefill_ms"]) == len(entry["segment_kv_bytes"]) == 3
        assert sum(entry["segment_kv_bytes"]) == entry["kv_cache_bytes"]
    # fastv's first segment holds every visual token, the later ones 162; uniform holds 300 throughout
    assert fastv["segment_kv_bytes"][0] > uniform["segment_kv_bytes"][0]
    assert fastv["segment_kv_bytes"][2] < uniform["segment_kv_bytes"][2]
    assert report["settings"]["cuts"] == [2, 4]


def test_a_cut_decoder_binds_nothing_per_token(fastv_dir, image):
    """Per generation every segment binds only its prefill's inputs and outputs (a cut segment's
    included); the decode binding (the next segment's token buffer for a cut segment) is made once
    per cache size, however many tokens the loop decodes."""
    pipe = Pipeline.load(fastv_dir)

    # prefill: input, positions, slots, its present rows (2 a layer: 4 here) (+ the two outputs of a
    # cut segment); decode: nothing (its binding was made once, by the first generation)
    assert count_bindings(pipe, image, PROMPT, 16) == count_bindings(pipe, image, PROMPT, 5) == [9, 9, 7]


def test_fp16_converts_every_segment_and_int8_refuses_cuts(tmp_path, deep, image):
    from tops_edge.errors import InputError

    out = export_model(deep, tmp_path / "fp16", selector="fastv", keep=300, cuts=[2], precision="fp16", progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {manifest["parts"][f"decoder.{i}"]["precision"] for i in (0, 1)} == {"fp16"}
    assert manifest["decoder"]["kv_dtype"] == "float16"
    r = Pipeline.load(out).generate(image, PROMPT, max_new_tokens=4)
    assert len(r.token_ids) >= 1 and r.stages[0]["layer"] == 2
    with pytest.raises(InputError, match="int8"):
        export_model(deep, tmp_path / "int8", selector="fastv", keep=300, cuts=[2], precision="int8", progress=False)
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize("name, keep", [("tiny-llava", 400), ("tiny-llava-next", 1000)])
def test_the_builtin_tiny_models_cut_at_1_equal_hf_layers(tmp_path, name, keep, image):
    """The built-in 2-layer models, cut before layer 1 with fastv pruning there (compact positions;
    a 500x300 image gives LLaVA-NeXT 1536 selectable tokens, of which layer 1 on keeps about 460)."""
    from tops_edge.models import load

    adapter = load(name)
    out = export_model(adapter, tmp_path / name, selector="fastv", keep=keep, selector_params={"layer": 1},
                       progress=False)
    pipe = Pipeline.load(out)
    assert pipe.cuts == (1,)
    picture = image if name == "tiny-llava" else image.resize((500, 300))
    _assert_equals_hf_layers(pipe, adapter.model, adapter.processor, picture, PROMPT, adapter.eos_token_ids[0])


def test_the_build_plan_shows_each_segments_kv_and_they_sum_to_the_plans(fastv_dir):
    import re

    from tops_edge.engines.build import describe_build

    text = describe_build(fastv_dir, "orin-nano", "fp16")
    kv_row = float(re.search(r"KV cache\s+([\d.]+)", text).group(1))  # GiB, 2 decimals
    segments = [float(x) for x in re.findall(r"decoder\.\d\s+layers \d+-\d+\s+([\d.]+) MiB", text)]
    assert len(segments) == 3 and len(set(segments)) == 1  # 2 layers each
    assert abs(sum(segments) / 1024 - kv_row) < 0.006


def test_show_kept_draws_one_row_per_stage(tmp_path, deep, capsys):
    """pdrop prunes at three cuts: the picture has a row per stage, each stage's kept patches a subset
    of the one before (selection only: no merged-groups panel)."""
    from PIL import Image

    from tops_edge.cli import run_main

    out = export_model(deep, tmp_path / "pdrop", selector="pdrop", keep=300, progress=False)
    picture = tmp_path / "kept.png"
    assert run_main([str(out), "--image", str(EXAMPLE), "--prompt", PROMPT, "--max-new-tokens", "1",
                     "--show-kept", str(picture), "--quiet"]) == 0
    width, height = Image.open(picture).size
    assert (width, height) == (672, 18 + 3 * (18 + 672) + 2 * 8)  # title, then three captioned rows


def test_a_method_that_prunes_before_and_inside_the_llm_runs_both_graphs(tmp_path, deep, image):
    """A method with stage "both" (here uniform before the LLM, fastv at the cut): the export writes
    its two graphs, the runtime runs the first on the projected tokens and the second at the cut on
    the survivors, and the result equals HF's layers fed the stage-0 tokens and the cut's rows."""
    from tops_edge import selector as registry
    from tops_edge.selector.base import _REGISTRY, CutForm, Schedule, SelectorInfo

    uniform, fastv = registry.get("uniform"), registry.get("fastv")
    registry.register(SelectorInfo(
        name="uniform+fastv", summary="a test: uniform before the LLM, fastv at layer 2", params={"layer": 2},
        extra_inputs=uniform.extra_inputs, reference=uniform.reference, onnx_form=uniform.onnx_form, stage="both",
        schedule=Schedule(layers=lambda p, n: (0, 2), budgets=lambda p, layers, t, n, depth: (3 * t // 2, 3 * t // 4)),
        cut=CutForm(fastv.extra_inputs, fastv.reference, fastv.onnx_form)))
    try:
        out = export_model(deep, tmp_path / "both", selector="uniform+fastv", keep=200, merge="none", progress=False)
        manifest = json.loads((out / "manifest.json").read_text())
        assert {"selector", "cut_selector"} <= set(manifest["parts"]) and manifest["decoder"]["cuts"] == [2]
        pipe = Pipeline.load(out)
        r = pipe.generate(image, PROMPT, max_new_tokens=NEW_TOKENS, output_logits=True)
        assert [(s["layer"], s["keep"]) for s in r.stages] == [(0, 300), (2, 150)]
        first, cut = (s["kept_indices"] for s in r.stages)
        assert set(cut) < set(first)
        slot, after = _prompt_rows(deep, PROMPT)
        embeds = hf_pruned_inputs_embeds(deep.model, deep.processor, image, PROMPT, first)
        rows = _keep_rows(r.stages[1:], slot, after, 576, alive=first)
        ref, logits, attention = hf_cut_greedy(deep.model, embeds, torch.zeros(embeds.shape[1]), [2, 4],
                                               [rows[0], None], NEW_TOKENS, positions=pipe.positions,
                                               eos_token_id=deep.eos_token_ids[0])
        assert r.token_ids == ref
        np.testing.assert_allclose(r.logits[0], logits.numpy(), atol=1e-4)
        # the cut ran fastv's graph: its reference on HF's layer-1 attention over the 300 survivors
        text_attention = attention[2][slot + 300:, slot:slot + 300][None]
        chosen = fastv.reference({"text_attention": text_attention}, 150, {"layer": 2}, (1, 300))[0]
        assert [first[i] for i in chosen.tolist()] == cut
    finally:
        _REGISTRY.pop("uniform+fastv")


def test_tops_eval_reports_a_budget_a_plan_cannot_reach_and_runs_the_rest(tmp_path, deep, capsys):
    """fastv at layer 2 of 6 layers cannot average 64 of 576 tokens (its smallest is 193): that cell
    is reported unreachable, found before any answer, and the other cells run."""
    from tops_edge.cli import eval_main

    out = export_model(deep, tmp_path / "fastv", selector="fastv", keep=300, cuts=[2], progress=False)
    report = tmp_path / "eval.json"
    plot = tmp_path / "eval.png"
    assert eval_main([str(out), "--limit", "2", "--keep", "300,64", "--selector", "fastv,uniform",
                      "--types", "count", "--max-new-tokens", "1", "--json", str(report), "--plot", str(plot),
                      "--quiet"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(report.read_text())
    assert set(data["unreachable"]) == {"fastv"} and set(data["unreachable"]["fastv"]) == {"64"}
    assert "smallest it reaches is 193" in data["unreachable"]["fastv"]["64"]
    assert set(data["table"]["fastv"]) == {"300"} and set(data["table"]["uniform"]) == {"300", "64"}
    assert "64" not in data["agreement"]["fastv"] and "64" not in data["versus"]["against"].get("uniform", {})
    assert "unreachable" in printed and plot.stat().st_size > 0


def test_cut_attention_is_over_every_cache_slot_whatever_the_past_binding(fastv_dir, deep):
    """A cut segment's cut_attention [1, S, C] puts each query's probabilities at the cache slots:
    the past's, then this step's own keys at cache_position (present holds only the step's rows
    [1, H, S, D]). A prefill into an empty cache gives the same with the past bound as 0 slots (what
    the runtime binds), and a decode step's row equals the last row of a prefill one token longer."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(fastv_dir / "decoder.0.onnx"), providers=["CPUExecutionProvider"])
    pasts = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values.")]
    h, d, e = deep.num_kv_heads, deep.head_dim, deep.hidden_size
    seq, capacity = 9, 14
    x = np.random.default_rng(0).standard_normal((1, seq + 1, e)).astype(np.float32)

    def run(embeds, start, past):
        n = embeds.shape[1]
        filled = np.zeros((1, capacity), np.int64)
        filled[0, : start + n] = 1
        feeds = {"inputs_embeds": embeds, "attention_mask": filled,
                 "attention_bias": np.zeros((1, capacity), np.float32), "position_ids": np.arange(start, start + n)[None], "cache_position": np.arange(start, start + n),
                 **dict(zip(pasts, past))}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))

    full = [np.zeros((1, h, capacity, d), np.float32) for _ in pasts]
    prefill = run(x[:, :seq], 0, full)
    empty = run(x[:, :seq], 0, [np.zeros((1, h, 0, d), np.float32) for _ in pasts])
    assert prefill["cut_attention"].shape == (1, seq, capacity)
    np.testing.assert_allclose(empty["cut_attention"], prefill["cut_attention"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(prefill["cut_attention"].sum(-1), 1.0, atol=1e-5)
    assert not prefill["cut_attention"][..., seq:].any()  # nothing on the empty slots
    for name, buffer in zip(pasts, full):
        rows = prefill[name.replace("past_key_values.", "present.")]
        assert rows.shape == (1, h, seq, d)
        buffer[:, :, :seq] = rows
    step = run(x[:, seq:], seq, full)
    longer = run(x, 0, [np.zeros((1, h, capacity, d), np.float32) for _ in pasts])
    np.testing.assert_allclose(step["cut_attention"][0, 0], longer["cut_attention"][0, seq], rtol=0, atol=1e-6)
    np.testing.assert_allclose(step["cut_hidden_states"][0, 0], longer["cut_hidden_states"][0, seq], rtol=0, atol=1e-4)
