"""The memory planner and device presets: LLaVA-1.5-7B's figures checked against hand computation.

LLaVA-1.5-7B as exported (its config is built in, no weights needed):
  vision  CLIP ViT-L/14-336, the 23 layers feature layer -2 runs, + the 2-layer projector
          matmul 23 x (4 x 1024^2 + 2 x 1024 x 4096) + (1024 x 4096 + 4096^2)      =   310,378,496
          other: patch conv 602,112 + [CLS] 1,024 + positions 577 x 1024 + pre-LN 2,048
                 + 23 x 13,312 (biases, 2 LNs) + projector biases 8,192           =     1,510,400
  embed   32064 x 4096                                                             =   131,334,144
  decoder 32 x (4 x 4096^2 + 3 x 4096 x 11008) + lm_head 32064 x 4096             = 6,607,339,520
          norms 32 x 2 x 4096 + 4096                                              =       266,240
"""

from __future__ import annotations

import math

import pytest

from tops_edge.cli import export_main
from tops_edge.models.architecture import load_architecture
from tops_edge.plan import PRESETS, check_fits, footprint_of, get_preset, plan_memory
from tops_edge.plan.memory import DoesNotFitError
from tops_edge.plan.profiles import optimization_profiles
from cli_helpers import one_line_error

GIB = 2**30
VISION_MATMUL = 23 * (4 * 1024**2 + 2 * 1024 * 4096) + (1024 * 4096 + 4096**2)
VISION_OTHER = 602_112 + 1_024 + 577 * 1024 + 2_048 + 23 * 13_312 + 8_192
EMBED = 32064 * 4096
DECODER_MATMUL = 32 * (4 * 4096**2 + 3 * 4096 * 11008) + 32064 * 4096
DECODER_OTHER = 32 * 2 * 4096 + 4096
PARAMS = VISION_MATMUL + VISION_OTHER + EMBED + DECODER_MATMUL + DECODER_OTHER

# preset: (memory GiB, reserved GiB, workspace GiB, context used for the 7B (model max 4096))
PRESET_FIGURES = {
    "orin-nano": (8, 1.5, 0.5, 2048),
    "orin-nx": (16, 2.0, 1.0, 4096),
    "agx-orin-32": (32, 3.0, 2.0, 4096),
    "agx-orin": (64, 4.0, 4.0, 4096),
    "thor": (128, 6.0, 8.0, 4096),
    "rtx": (24, 1.0, 4.0, 4096),
}
FP16_FITS = {"orin-nano": False, "orin-nx": False, "agx-orin-32": True, "agx-orin": True, "thor": True, "rtx": True}


@pytest.fixture(scope="module")
def llava7b():
    adapter = load_architecture("llava-v1.5-7b")
    return adapter, footprint_of(adapter)


def test_7b_parameter_counts_match_the_hand_computed_ones(llava7b):
    _, fp = llava7b
    assert (fp.vision_matmul, fp.vision_other, fp.embed, fp.decoder_matmul, fp.decoder_other) == (
        VISION_MATMUL, VISION_OTHER, EMBED, DECODER_MATMUL, DECODER_OTHER)
    assert PARAMS == 7_063_427_072 - 12_596_224 - 2_048  # HF's total less the unused last layer and post-LN
    assert (fp.num_layers, fp.num_kv_heads, fp.head_dim, fp.max_context, fp.tokens_per_image) == (32, 32, 128, 4096, 576)


def test_7b_architecture_loads_on_the_meta_device_without_weights(llava7b):
    adapter, _ = llava7b
    assert next(adapter.model.parameters()).device.type == "meta"


@pytest.mark.parametrize("device", list(PRESET_FIGURES))
def test_7b_fp16_plan_on_each_preset_matches_hand_computation(llava7b, device):
    _, fp = llava7b
    memory, reserved, workspace, context = PRESET_FIGURES[device]
    plan = plan_memory(fp, get_preset(device), "fp16")
    expected = {
        "weights: vision": 2 * (VISION_MATMUL + VISION_OTHER),
        "weights: embed": 2 * EMBED,
        "weights: decoder": 2 * (DECODER_MATMUL + DECODER_OTHER),
        "KV cache": 2 * 32 * 32 * 128 * 2 * context,  # one buffer x (K, V) x layers x heads x dim x fp16
        "activations": (576 + 512) * (4 * 4096 + 2 * 11008) * 2 + 32064 * 4,
        "TensorRT workspace": int(workspace * GIB),
        "reserved (OS, CUDA, libraries)": int(reserved * GIB),
    }
    assert {item: b for item, b, _ in plan.rows} == expected
    assert plan.total == sum(expected.values())
    assert plan.fits == (sum(expected.values()) <= memory * GIB) == FP16_FITS[device]


def test_7b_weights_per_precision(llava7b):
    _, fp = llava7b
    weights = lambda p: sum(b for item, b, _ in plan_memory(fp, PRESETS["thor"], p).rows if item.startswith("weights"))  # noqa: E731
    assert weights("fp32") == 4 * PARAMS
    assert weights("fp16") == 2 * PARAMS
    assert weights("int8-wo") == 2 * (VISION_MATMUL + VISION_OTHER + EMBED + DECODER_OTHER) + DECODER_MATMUL
    head = 32064 * 4096  # Q/DQ int8 keeps the LM head float (fp16 in the engine)
    assert weights("int8") == VISION_MATMUL + 2 * (VISION_OTHER + EMBED + DECODER_OTHER) + DECODER_MATMUL - head + 2 * head
    kv = lambda p: dict((i, b) for i, b, _ in plan_memory(fp, PRESETS["thor"], p).rows)["KV cache"]  # noqa: E731
    assert kv("fp32") == 2 * kv("fp16") == 2 * kv("int8")


def test_7b_fp16_on_orin_nx_is_refused_naming_int8_weight_only(llava7b):
    _, fp = llava7b
    with pytest.raises(DoesNotFitError, match=r"needs 18\.2 GiB on orin-nx .*--precision int8-wo would fit \(12\.1 GiB\)"):
        check_fits(fp, get_preset("orin-nx"), "fp16", "llava-7b")


def test_7b_fp16_on_orin_nano_is_refused_naming_int4_weight_only(llava7b):
    """One KV buffer per tensor (1 GiB at fp16 and orin-nano's 2048 tokens, not 2) lets int4-wo fit
    the 8 GB board: 7.2 GiB (it needed 8.2 with two)."""
    _, fp = llava7b
    with pytest.raises(DoesNotFitError, match=r"needs 16\.2 GiB on orin-nano .*--precision int4-wo would fit \(7\.2 GiB\)"):
        check_fits(fp, get_preset("orin-nano"), "fp16", "llava-7b")


def test_dry_run_prints_the_plan_and_exports_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert export_main(["--model", "llava-v1.5-7b", "--out", str(out), "--device", "agx-orin", "--precision", "fp16", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "agx-orin" in table and "KV cache" in table and "verdict: fits" in table
    assert not out.exists()


def test_dry_run_of_a_plan_that_does_not_fit_prints_it_then_one_line_error(tmp_path, capsys):
    code = export_main(["--model", "llava-v1.5-7b", "--out", str(tmp_path / "o"), "--device", "orin-nano",
                        "--precision", "fp16", "--dry-run"])
    captured = capsys.readouterr()
    assert "does NOT fit" in captured.out
    assert code != 0 and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1 and "orin-nano" in captured.err


#: the built-in configs (models/architecture.py KNOWN_CONFIGS) by alias, with their decoder's KV shape
BUILT_IN = {"llava-v1.5-7b": "32 layers x 32 heads x 128", "llava-v1.6-7b": "32 layers x 32 heads x 128",
            "llava-v1.6-mistral-7b": "32 layers x 8 heads x 128", "qwen2.5-vl-3b": "36 layers x 2 heads x 128",
            "qwen2.5-vl-7b": "28 layers x 4 heads x 128", "qwen3-vl-2b": "28 layers x 8 heads x 128",
            "qwen3-vl-4b": "36 layers x 8 heads x 128", "qwen3-vl-8b": "36 layers x 8 heads x 128"}


@pytest.mark.parametrize("alias", sorted(BUILT_IN))
def test_dry_run_of_every_built_in_config_on_every_preset(alias, tmp_path, capsys):
    """Each alias plans from its built-in config on every preset, without the weights: the plan is
    printed, and a plan that does not fit ends in one line and a non-zero exit."""
    for device in PRESETS:
        args = ["--model", alias, "--out", str(tmp_path / "o"), "--device", device, "--precision", "int4-wo", "--dry-run"]
        if alias.startswith("qwen"):  # their published cap (16384 tokens) is no edge setting
            args += ["--max-image-tokens", "1024"]
        code = export_main(args)
        captured = capsys.readouterr()
        assert f"on {device} " in captured.out and BUILT_IN[alias] in captured.out
        fits = "verdict: fits" in captured.out
        assert (code == 0) == fits and "Traceback" not in captured.err
        if not fits:
            assert len(captured.err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_prefill_is_at_most_the_context():
    """LLaVA-NeXT's largest image (2928 tokens) + 512 prompt tokens is more than orin-nano's 2048-token
    context: no prompt can be longer than the context, so the plan and the profiles stop there."""
    fp = footprint_of(load_architecture("llava-v1.6-7b"))
    plan = plan_memory(fp, get_preset("orin-nano"), "int4-wo")
    assert plan.context == 2048 and plan.prefill_tokens == 2048
    assert plan_memory(fp, get_preset("agx-orin"), "int4-wo").prefill_tokens == 2928 + 512


def test_dry_run_needs_a_device(tmp_path, capsys):
    line = one_line_error(capsys, export_main(["--model", "tiny-llava", "--out", str(tmp_path / "o"), "--dry-run"]))
    assert "--device" in line


def test_export_with_a_device_refuses_before_any_work(tmp_path, capsys, monkeypatch):
    from tops_edge.plan import devices

    monkeypatch.setitem(devices.PRESETS, "orin-nano", devices.DevicePreset("orin-nano", "tiny", 1.0, 0.9, 0.5, 2048, 3))
    line = one_line_error(capsys, export_main(["--model", "tiny-llava", "--out", str(tmp_path / "o"), "--device", "orin-nano", "--quiet"]))
    assert "needs" in line and "orin-nano" in line
    assert not (tmp_path / "o").exists()


def test_profiles_follow_the_manifest_and_the_preset():
    manifest = {
        "visual": {"layout": "single", "tokens_per_crop": 576, "max_tokens": 576, "max_selectable": 576},
        "decoder": {"max_context": 4096},
        "parts": {
            "selector": {"inputs": [{"name": "image_features", "shape": ["num_images", 576, 4096]}, {"name": "keep", "shape": []}]},
            "decoder": {"inputs": [{"name": "inputs_embeds", "shape": ["batch", "sequence", 4096]},
                                   {"name": "attention_mask", "shape": ["batch", "cache_sequence"]},
                                   {"name": "cache_position", "shape": ["sequence"]},
                                   {"name": "past_key_values.0.key", "shape": ["batch", 32, "cache_sequence", 128]}]},
        },
    }
    p = optimization_profiles(manifest, get_preset("orin-nano"))  # context 2048 on this preset
    assert p["selector"]["image_features"] == ((1, 576, 4096),) * 3
    assert p["selector"]["keep"] == ((1,), (128,), (576,))
    assert p["decoder"]["inputs_embeds"] == ((1, 1, 4096), (1, 1, 4096), (1, 576 + 512, 4096))
    assert p["decoder"]["attention_mask"] == ((1, 1), (1, 1024), (1, 2048))
    assert p["decoder"]["cache_position"] == ((1,), (1,), (576 + 512,))
    assert p["decoder"]["past_key_values.0.key"] == ((1, 32, 1, 128), (1, 32, 1024, 128), (1, 32, 2048, 128))


def test_build_plans_the_kv_cache_at_the_exports_kv_dtype(llava7b):
    """Engines keep the graphs' KV IO dtype: an fp32-IO export costs fp32 KV even in an fp16 build."""
    _, fp = llava7b
    rows = lambda **kw: {i: b for i, b, _ in plan_memory(fp, get_preset("thor"), "fp16", **kw).rows}  # noqa: E731
    assert rows(kv_bytes=4)["KV cache"] == 2 * rows()["KV cache"] == 2 * 32 * 32 * 128 * 4 * 4096
    assert rows(kv_bytes=4)["weights: decoder"] == rows()["weights: decoder"]


def test_tiny_footprint_counts_what_the_exported_graphs_hold(tiny, tiny_none_dir):
    """The tiny model's counts match the initializers of its exported graphs (exactly for embed; within 1%
    elsewhere, because the exporter stores identical tensors, e.g. the random model's all-ones norm
    weights, once)."""
    import onnx
    import numpy as np

    fp = footprint_of(tiny)
    numel = lambda part: sum(int(np.prod(t.dims)) for t in onnx.load(str(tiny_none_dir / f"{part}.onnx")).graph.initializer)  # noqa: E731
    assert numel("embed") == fp.embed
    assert numel("vision") == pytest.approx(fp.vision_matmul + fp.vision_other, rel=0.01)
    assert numel("decoder") == pytest.approx(fp.decoder_matmul + fp.decoder_other, rel=0.01)


@pytest.mark.parametrize("precision", ["fp16", "int8-wo", "int4-wo"])
@pytest.mark.parametrize("device", ["orin-nano", "agx-orin"])
def test_7b_build_time_estimate_matches_hand_computation(llava7b, precision, device):
    from tops_edge.plan.build import EXPORT_OVERHEAD, PASS_FACTOR, plan_build

    _, fp = llava7b
    _, reserved, workspace, _ = PRESET_FIGURES[device]
    build = plan_build(fp, get_preset(device), precision)
    decoder32 = 4 * (DECODER_MATMUL + DECODER_OTHER)
    assert dict((i, b) for i, b, _ in build.host) == {
        "export (torch, fp32)": 4 * PARAMS + EXPORT_OVERHEAD,
        f"{precision} passes": math.ceil(PASS_FACTOR[precision] * decoder32)}
    graph_w, engine_w = {"fp16": (2, 2), "int8-wo": (1, 1), "int4-wo": (17 / 32, 17 / 32)}[precision]
    graph_o = 2 if precision == "fp16" else 4  # the quantized exports keep their other weights fp32 in the graph
    graph = math.ceil(DECODER_MATMUL * graph_w + DECODER_OTHER * graph_o)
    engine = math.ceil(DECODER_MATMUL * engine_w + DECODER_OTHER * 2)
    assert build.largest_part == "decoder"
    assert [b for _, b, _ in build.device_rows] == [graph, engine, engine, int(workspace * GIB), int(reserved * GIB)]
    assert build.device_peak == graph + 2 * engine + int((workspace + reserved) * GIB)
    assert build.host_peak == max(4 * PARAMS + EXPORT_OVERHEAD, math.ceil(PASS_FACTOR[precision] * decoder32))


def test_dry_run_prints_the_build_estimate(capsys):
    from tops_edge.cli import export_main

    assert export_main(["--model", "llava-v1.5-7b", "--out", "unused", "--device", "orin-nano", "--precision",
                        "int4-wo", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "host RAM to export" in out and "device RAM to build" in out and "build: " in out


def test_build_estimate_reads_the_graphs_at_the_exports_precision(llava7b):
    from tops_edge.plan.build import plan_build

    _, fp = llava7b
    same = plan_build(fp, get_preset("agx-orin"), "fp16")
    from_fp32 = plan_build(fp, get_preset("agx-orin"), "fp16", "fp32")  # an fp32 export built at fp16
    assert from_fp32.device_rows[0][1] == 4 * (DECODER_MATMUL + DECODER_OTHER) == 2 * same.device_rows[0][1]
    assert from_fp32.device_rows[1:] == same.device_rows[1:]
