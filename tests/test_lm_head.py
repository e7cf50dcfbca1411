"""The LM head in vocabulary chunks (issue 22 item 3): the planner's estimate and chunk count checked
by hand, and exports whose head is split computing exactly the logits of the unsplit head."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tops_edge.calib import graphs
from tops_edge.cli import build_main, export_main
from tops_edge.export import export_model
from tops_edge.models.architecture import load_architecture
from tops_edge.plan import PRESETS, footprint_of, get_preset, plan_memory
from tops_edge.plan import devices
from tops_edge.plan.memory import VOCAB_ALIGN, lm_head_chunks, lm_head_workspace, vocabulary_chunks

GIB = 1 << 30


def test_vocabulary_chunks_cover_the_vocabulary_in_aligned_slices():
    assert vocabulary_chunks(151936, 3) == [50688, 50688, 50560]  # 151936 / 3 = 50645.3 -> 396 x 128
    assert vocabulary_chunks(32064, 1) == [32064]
    assert vocabulary_chunks(1000, 7) == [256, 256, 256, 232]  # the rounding uses the vocabulary up after 4
    assert vocabulary_chunks(100, 3) == [100]  # one aligned chunk already holds it all
    for vocab, n in ((151936, 5), (32064, 2), (261, 3), (152064, 4)):
        rows = vocabulary_chunks(vocab, n)
        assert sum(rows) == vocab and all(r % VOCAB_ALIGN == 0 for r in rows[:-1]) and 0 < rows[-1] <= rows[0]
    with pytest.raises(Exception, match="at least 1"):
        vocabulary_chunks(100, 0)


@pytest.mark.parametrize("alias, device, chunks", [
    ("qwen3-vl-2b", "orin-nano", 3),  # 151936 x 2048 x 4 B = 1.16 GiB over 0.5
    ("qwen3-vl-2b", "orin-nx", 2),  # over 1.0
    ("qwen3-vl-2b", "agx-orin-32", 1),
    ("qwen2.5-vl-7b", "orin-nano", 5),  # 151936 x 3584 x 4 B = 2.03 GiB
    ("llava-v1.5-7b", "orin-nano", 1),  # 32064 x 4096 x 4 B = 0.49 GiB, under 0.5
])
def test_the_planner_splits_the_head_where_its_workspace_estimate_exceeds_the_preset(alias, device, chunks):
    fp = footprint_of(load_architecture(alias))
    hand = fp.vocab_size * fp.hidden_size * 4
    assert lm_head_workspace(fp) == hand
    preset = get_preset(device)
    assert lm_head_chunks(fp, preset) == chunks == len(vocabulary_chunks(fp.vocab_size, math.ceil(hand / preset.workspace_bytes)))
    plan = plan_memory(fp, preset, "int4-wo")
    assert plan.head_chunks == chunks and plan.to_json()["lm_head"] == {"workspace_bytes": hand, "chunks": chunks}


def test_dry_run_prints_the_head_line(capsys):
    assert export_main(["--model", "qwen3-vl-2b", "--out", "unused", "--device", "orin-nano", "--precision", "int4-wo",
                        "--dry-run"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "LM head" in x)
    assert f"~{151936 * 2048 * 4 / GIB:.2f} GiB" in line and "3 MatMuls over vocabulary slices" in line


def test_a_bad_chunk_count_is_one_line(tmp_path, capsys):
    assert export_main(["--model", "tiny-llava", "--out", str(tmp_path / "x"), "--lm-head-chunks", "0", "--quiet"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lm-head-chunks must be at least 1" in err[0]
    assert not (tmp_path / "x").exists()


def _decoder_feeds(session, steps: int = 7, capacity: int = 16, past: int = 0, seed: int = 0) -> dict:
    """A prefill (past = 0) or a step after `past` filled slots, random hidden states and cache."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        dims = {"batch": 1, "sequence": steps, "cache_sequence": capacity, "past_sequence": capacity if past else 0}
        shape = [dims[d] if isinstance(d, str) else d for d in spec.shape]
        if spec.name == "attention_mask":
            feeds[spec.name] = (np.arange(capacity) < past + steps).astype(np.int64)[None]
        elif spec.name == "cache_position":
            feeds[spec.name] = np.arange(past, past + steps, dtype=np.int64)
        elif spec.name == "position_ids":
            feeds[spec.name] = np.arange(past, past + steps, dtype=np.int64)[None]
        elif spec.name == "attention_bias":
            feeds[spec.name] = np.zeros(shape, np.float32)
        else:
            dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


PRECISIONS = [("fp32", None), ("fp16", None), ("int8-wo", None), ("int4-wo", "rtn")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    out = {}
    for precision, method in PRECISIONS:
        for chunks in (1, 3):
            out[precision, chunks] = export_model("tiny-llava", root / f"{precision}-{chunks}", precision=precision,
                                                  int4_method=method, lm_head_chunks=chunks, progress=False)
    return out


@pytest.mark.parametrize("precision", [p for p, _ in PRECISIONS])
def test_a_split_head_gives_exactly_the_unsplit_logits(exports, precision):
    whole, split = exports[precision, 1], exports[precision, 3]
    manifest = json.loads((split / "manifest.json").read_text())
    vocab = manifest["decoder"]["vocab_size"]
    assert manifest["decoder"]["lm_head_chunks"] == vocabulary_chunks(vocab, 3) == [128, 128, vocab - 256]
    assert json.loads((whole / "manifest.json").read_text())["decoder"]["lm_head_chunks"] == [vocab]
    graph = onnx.load(str(split / "decoder.onnx"))
    heads = graphs.lm_head(graph)
    assert len(heads) == 3 and len(graphs.lm_head(onnx.load(str(whole / "decoder.onnx")))) == 1
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    a = ort.InferenceSession(str(whole / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(split / "decoder.onnx"), options, providers=["CPUExecutionProvider"])
    for feeds in (_decoder_feeds(a), _decoder_feeds(a, steps=1, past=9, seed=1)):  # a prefill, a decode step
        la, lb = a.run(["logits"], feeds)[0], b.run(["logits"], feeds)[0]
        assert la.shape == lb.shape == (1, 1, vocab)
        if precision == "fp16":
            # both graphs' head MatMuls are fp16 (cast to fp32 at the output); ORT's CPU, which has no
            # fp16 GEMM, computes them in fp32 and, depending on its cast rewrites, rounds one graph's
            # output to fp16 and not the other's: the same values once both are rounded as the graph says
            la, lb = la.astype(np.float16), lb.astype(np.float16)
        np.testing.assert_array_equal(la, lb)


def test_int8_keeps_every_head_chunk_float(tmp_path):
    from tops_edge.calib.passes import int8_excluded_nodes

    out = export_model("tiny-llava", tmp_path / "i8", precision="int8", lm_head_chunks=2, progress=False)
    graph = onnx.load(str(out / "decoder.onnx"))
    heads = graphs.lm_head(graph)
    assert len(heads) == 2 and set(heads) <= set(int8_excluded_nodes(graph))
    producers = {o: n for n in graph.graph.node for o in n.output}
    for node in (n for n in graph.graph.node if n.name in heads):
        assert all(producers[i].op_type != "DequantizeLinear" for i in node.input if i in producers)


def test_device_export_splits_as_planned_and_tops_build_warns_on_an_unsplit_one(tmp_path, monkeypatch, capsys):
    small = replace(PRESETS["orin-nano"], workspace_gib=30_000 / GIB)  # a preset whose workspace a tiny head exceeds
    monkeypatch.setitem(devices.PRESETS, "orin-nano", small)
    arch = footprint_of(load_architecture("tiny-llava"))
    want = len(vocabulary_chunks(arch.vocab_size, math.ceil(arch.vocab_size * arch.hidden_size * 4 / small.workspace_bytes)))
    assert want > 1
    out = export_model("tiny-llava", tmp_path / "dev", device="orin-nano", progress=False)
    assert len(json.loads((out / "manifest.json").read_text())["decoder"]["lm_head_chunks"]) == want
    plain = export_model("tiny-llava", tmp_path / "plain", progress=False)
    assert build_main([str(out), "--device", "orin-nano", "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().out
    assert build_main([str(plain), "--device", "orin-nano", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert f"LM head as 1 MatMul(s)" in text and f"--lm-head-chunks {want}" in text


def test_a_decoder_in_segments_splits_the_head_of_its_last_segment(tmp_path):
    out = export_model("tiny-llava", tmp_path / "cut", selector="fastv", cuts=(1,), lm_head_chunks=2, progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    first, last = (s["part"] for s in manifest["decoder"]["segments"])
    assert len(graphs.lm_head(onnx.load(str(out / f"{last}.onnx")))) == 2
    assert graphs.lm_head(onnx.load(str(out / f"{first}.onnx"))) == []  # it ends at the cut: no logits
