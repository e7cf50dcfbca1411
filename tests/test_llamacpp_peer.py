"""`tops-bench --compare llama.cpp` and the limits beside the figures.

Without llama-cpp-python (CI never builds it): the limits' arithmetic checked by hand, the missing
extra and bad arguments as one line, the alternation and per-pair ratios on synthetic runs, and the
whole runner path with a stand-in peer. With it (and LLAMA_CPP_SRC naming llama-cpp-python's sdist
or a llama.cpp tree, for the converters): convert tiny-llava, check it, and benchmark against it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tops_edge.bench import format_table, run_benchmark, validate
from tops_edge.bench import limits as lim
from tops_edge.bench import llamacpp, runner
from tops_edge.bench.report import csv_text
from tops_edge.cli import bench_main
from tops_edge.errors import BackendUnavailableError, InputError
from cli_helpers import one_line_error

ROOT = Path(__file__).resolve().parents[1]
# tiny-llava-medium's decoder: Llama 4 x 512, 8 query heads over 4 KV heads of 64, MLP 1376, vocab 261
MEDIUM = lim.DecoderShape(num_layers=4, hidden_size=512, intermediate_size=1376, num_heads=8, num_kv_heads=4,
                          head_dim=64, vocab_size=261)


# --- the limits, by hand ------------------------------------------------------------------------
def test_flops_per_token_and_pair_by_hand():
    # q 512x512, k and v 512x256 each, o 512x512, gate/up/down 3 x 512x1376; 2 FLOPs per multiply-add
    assert MEDIUM.linear_flops_per_token() == 2 * (262144 + 131072 + 131072 + 262144 + 3 * 704512) == 5_799_936
    assert MEDIUM.attention_flops_per_pair() == 2 * 2 * 8 * 64 == 2048
    assert MEDIUM.lm_head_flops() == 2 * 512 * 261


def test_prefill_flops_by_hand():
    # 627 tokens (576 visual + 51 text), causal: 627*628/2 = 196878 pairs per layer
    assert lim.attention_pairs(627) == 196_878
    assert lim.attention_pairs(627, "dense", 63) == 627 * 690
    expected = 4 * (627 * 5_799_936 + 196_878 * 2048) + 267_264
    assert lim.prefill_flops(MEDIUM, [(4, 627)]) == expected == 16_159_331_328
    # K = 128 -> 179 tokens; the FLOP-limit ratio the benchmark page quotes (0.265 causal, 0.249 dense)
    causal = lim.prefill_flops(MEDIUM, [(4, 179)]) / lim.prefill_flops(MEDIUM, [(4, 627)])
    dense = lim.prefill_flops(MEDIUM, [(4, 179)], "dense", 63) / lim.prefill_flops(MEDIUM, [(4, 627)], "dense", 63)
    assert round(causal, 3) == 0.265 and round(dense, 3) == 0.249
    with pytest.raises(ValueError):
        lim.attention_pairs(10, "sparse")


def test_segments_sum_layers_times_tokens():
    # a cut at layer 2 keeping 64 of 576 visual tokens: 2 layers at 627 tokens, 2 at 51 + 64
    segs = lim.segment_tokens([(0, 2), (2, 4)], [{"layer": 2, "keep": 64}], 627, 576)
    assert segs == [(2, 627), (2, 115)]
    assert lim.prefill_flops(MEDIUM, segs) == (2 * (627 * 5_799_936 + 196_878 * 2048)
                                               + 2 * (115 * 5_799_936 + 6670 * 2048) + 267_264)
    # pruned before the LLM to 128: every segment holds 128 visual tokens
    assert lim.segment_tokens([(0, 4)], [{"layer": 0, "keep": 128}], 179, 576) == [(4, 179)]
    assert lim.segment_tokens([(0, 2), (2, 4)], [{"layer": 0, "keep": 128}, {"layer": 2, "keep": 32}], 179, 576) \
        == [(2, 179), (2, 83)]
    assert lim.other_tokens([{"layer": 0, "keep": 128}], 179, 576) == 51 == lim.other_tokens([], 627, 576)


def test_decode_limit_and_ratio():
    assert lim.decode_limit_ms(47_000_000, 23.5e9) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        lim.decode_limit_ms(1, 0)
    assert lim.ratio(1, 4) == 0.25 and lim.ratio(None, 4) is None and lim.ratio(1, 0) is None


def test_decoder_shape_and_weight_bytes_from_a_manifest():
    manifest = {
        "decoder": {"num_layers": 4, "hidden_size": 512, "head_dim": 64, "num_kv_heads": 4, "vocab_size": 261,
                    "segments": [{"part": "decoder.0", "layers": [0, 2]}, {"part": "decoder.1", "layers": [2, 4]}]},
        "footprint": {"intermediate_size": 1376},
        "parts": {"decoder.0": {"files": [{"bytes": 100}, {"bytes": 20}]}, "decoder.1": {"files": [{"bytes": 7}]},
                  "vision": {"files": [{"bytes": 10**9}]}},
    }
    assert lim.DecoderShape.from_manifest(manifest) == MEDIUM
    assert lim.decoder_weight_bytes(manifest) == 127  # the decoder segments' files only
    with pytest.raises(ValueError, match="intermediate_size"):
        lim.DecoderShape.from_manifest({**manifest, "footprint": {}})


def test_memory_bandwidth_counts_read_and_write_of_the_best_copy():
    ticks = iter([0.0, 0.5, 1.0, 1.25, 2.0, 2.75])  # copies of 0.5, 0.25, 0.75 s
    bw = lim.memory_bandwidth(mib=1, repeats=3, clock=lambda: next(ticks))
    assert bw.bytes_per_s == pytest.approx(2 * 2**20 / 0.25)
    assert "best of 3" in bw.method


# --- alternation and ratios on synthetic runs ---------------------------------------------------
def test_alternate_swaps_who_goes_first_and_skips_warmup():
    events, ticks = [], iter(range(0, 1000, 10))
    ours = lambda: events.append("ours") or len(events)  # noqa: E731
    theirs = lambda: events.append("peer") or {"n": len(events)}  # noqa: E731
    samples, peer = runner.alternate(ours, theirs, warmup=1, runs=3, clock=lambda: next(ticks))
    assert events == ["ours", "peer", "peer", "ours", "ours", "peer", "peer", "ours"]
    assert [r for r, _ in samples] == [4, 5, 8] and [p["n"] for p in peer] == [3, 6, 7]
    assert all(ms == 10_000 for _, ms in samples)


def fake_ours(vision, prefill, tpot, tokens=4, select=1.0):
    return SimpleNamespace(timings_ms={"preprocess": 1.0, "vision": vision, "select": select, "prefill": prefill,
                                       "decode_per_token": tpot}, token_ids=list(range(tokens)))


def fake_peer(vision, prefill, tpot, e2e, tokens=4):
    return {"timings_ms": {"preprocess": 2.0, "vision": vision, "prefill": prefill, "decode_per_token": tpot},
            "e2e_ms": e2e, "token_ids": list(range(tokens)), "prompt_tokens": 627}


def test_peer_entry_ratios_are_per_pair():
    samples = [(fake_ours(10, 100, 5), 130.0), (fake_ours(30, 100, 5), 150.0)]
    peers = [fake_peer(20, 200, 5, 260.0), fake_peer(30, 50, 10, 100.0)]
    e = runner.peer_entry(samples, peers)
    assert e["vision_ms"] == {"median": 25.0, "p90": 29.0}
    assert e["ttft_ms"]["median"] == pytest.approx((222 + 82) / 2)
    r = e["ratios"]
    assert r["vision"] == {"median": 0.75, "p90": 0.95}  # 10/20 and 30/30, not 20/25
    assert r["prefill"]["median"] == pytest.approx((0.5 + 2.0) / 2)
    assert r["ttft"]["median"] == pytest.approx((112 / 222 + 132 / 82) / 2, abs=1e-4)
    assert r["tpot"]["median"] == pytest.approx(0.75) and r["e2e"]["median"] == pytest.approx((0.5 + 1.5) / 2)
    assert e["generated_tokens"] == [4, 4] and e["prompt_tokens"] == 627


def test_selector_share_of_ttft():
    assert runner._select_share(fake_ours(10, 80, 1, select=10.0)) == pytest.approx(100 * 10 / 101)


# --- the missing extra and bad arguments: one line ----------------------------------------------
@pytest.fixture
def no_llama_cpp(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))


@pytest.fixture
def fake_llama_cpp(monkeypatch):
    """As if llama-cpp-python were installed (nothing imports it here)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: SimpleNamespace(name=name) if name == "llama_cpp" else real(name, *a))


def test_missing_extra_names_it(no_llama_cpp, tiny_uniform_dir, tmp_path, capsys):
    with pytest.raises(BackendUnavailableError, match=r'pip install -e "\.\[peer\]"'):
        run_benchmark(tiny_uniform_dir, keeps=[64], runs=1, warmup=0, compare="llama.cpp", gguf=tmp_path)
    line = one_line_error(capsys, bench_main([str(tiny_uniform_dir), "--compare", "llama.cpp", "--gguf", str(tmp_path),
                                              "--quiet"]))
    assert line.startswith("tops-bench: error:") and '".[peer]"' in line and "llama-cpp-python" in line


@pytest.mark.parametrize("args, needle", [
    (["--gguf", "/tmp"], "--compare llama.cpp"),
    (["--peer-option", "n_ubatch=64"], "--compare llama.cpp"),
    (["--compare", "llama.cpp"], "--gguf"),
    (["--compare", "llama.cpp", "--gguf", "/nonexistent-gguf"], "peer.json"),
    (["--compare", "llama.cpp", "--gguf", "/tmp", "--peer-option", "n_ubatch"], "KEY=VALUE"),
    (["--compare", "llama.cpp", "--gguf", "/tmp", "--peer-option", "threads=3"], "unknown llama.cpp option"),
    (["--compare", "llama.cpp", "--gguf", "/tmp", "--peer-option", "kv_type=q4"], "kv_type"),
    (["--compare", "llamacpp"], "invalid choice"),
])
def test_bad_peer_arguments_are_one_line(fake_llama_cpp, tiny_uniform_dir, capsys, args, needle):
    base = [str(tiny_uniform_dir), "--runs", "1", "--warmup", "0", "--new-tokens", "1", "--quiet"]
    line = one_line_error(capsys, bench_main(base + args))
    assert line.startswith("tops-bench: ") and needle in line


def test_peer_files_are_checked(tmp_path):
    with pytest.raises(InputError, match="peer.json"):
        llamacpp.load_peer_files(tmp_path)
    (tmp_path / "peer.json").write_text(json.dumps({"text": "text-f32.gguf", "mmproj": "mmproj-f32.gguf"}))
    with pytest.raises(InputError, match="text GGUF"):
        llamacpp.load_peer_files(tmp_path)
    (tmp_path / "text-f32.gguf").write_bytes(b"GGUF")
    (tmp_path / "mmproj-f32.gguf").write_bytes(b"GGUF")
    assert llamacpp.load_peer_files(tmp_path)["dir"] == str(tmp_path.resolve())
    assert llamacpp.check_options({"n_ubatch": 1024})["n_ubatch"] == 1024
    for bad in ({"n_ubatch": 0}, {"flash_attn": "maybe"}, {"n_batch": True}):
        with pytest.raises(InputError):
            llamacpp.check_options(bad)


def test_a_gguf_of_another_model_is_refused(fake_llama_cpp, tiny_uniform_dir, tmp_path):
    for name in ("t.gguf", "m.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    (tmp_path / "peer.json").write_text(json.dumps({"text": "t.gguf", "mmproj": "m.gguf", "config_sha256": "0" * 64,
                                                     "source": "other"}))
    with pytest.raises(InputError, match="another model"):
        run_benchmark(tiny_uniform_dir, keeps=[64], runs=1, warmup=0, compare="llama.cpp", gguf=tmp_path)


def test_the_script_parses_its_subcommands_without_llama_cpp(monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import compare_llamacpp as script
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    args = script.parser().parse_args(["convert", "out/tiny", "--out", "g", "--outtype", "f16"])
    assert (args.command, args.export_dir, args.out, args.outtype) == ("convert", "out/tiny", "g", "f16")
    assert script.parser().parse_args(["check", "g", "out/tiny"]).new_tokens == 64
    monkeypatch.delenv("LLAMA_CPP_SRC", raising=False)
    with pytest.raises(InputError, match="--llama-cpp"):
        script.LlamaCppTree(None)
    assert script.CLS_BUG != script.CLS_FIX and "class_embedding" in script.CLS_FIX


# --- the whole runner path with a stand-in peer -------------------------------------------------
class StandInPeer:
    """Answers like PeerProcess, from fixed timings (no llama.cpp)."""

    instances: list = []

    def __init__(self, spec, threads, n_ctx, options=None):
        self.spec, self.threads, self.n_ctx, self.calls, self.closed = spec, threads, n_ctx, [], False
        self.info = {"llama_cpp_python": "0.0-standin", "system_info": "none", "n_vocab": 261, "n_embd": 64,
                     "threads": threads, "n_ctx": n_ctx, "mtmd_lib": "bundled", "model_bytes": 1_000_000,
                     **llamacpp.check_options(options)}
        StandInPeer.instances.append(self)

    def set_image(self, image):
        self.image = image

    def generate(self, before, after, new_tokens, embd_out=None):
        import numpy as np

        self.calls.append((list(before), list(after), new_tokens))
        if embd_out:
            np.save(embd_out, np.zeros((576, 64), np.float32))
        return fake_peer(5.0, 20.0, 1.0, 40.0, tokens=new_tokens)

    def generate_from_features(self, before, after, features, new_tokens):
        assert features.shape[0] == 576
        return list(range(new_tokens))

    def peak_rss_bytes(self):
        return 123

    def close(self):
        self.closed = True


def test_compare_llama_cpp_alternates_and_reports(fake_llama_cpp, monkeypatch, tiny_uniform_dir, tmp_path):
    from tops_edge.runtime import Pipeline

    sha = json.loads((Path(tiny_uniform_dir) / "manifest.json").read_text())["model"]["config_sha256"]
    for name in ("t.gguf", "m.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    (tmp_path / "peer.json").write_text(json.dumps({"text": "t.gguf", "mmproj": "m.gguf", "config_sha256": sha,
                                                     "source": "tiny-llava", "text_type": "f32", "workarounds": ["w"]}))
    monkeypatch.setattr(llamacpp, "PeerProcess", StandInPeer)
    StandInPeer.instances.clear()
    report = run_benchmark(tiny_uniform_dir, keeps=[576, 64], runs=2, warmup=1, new_tokens=3, prompt_len=8,
                           compare="llama.cpp", gguf=tmp_path, peer_options={"n_ubatch": 256})
    validate(report)
    (peer,) = StandInPeer.instances
    assert peer.closed and len(peer.calls) == 2 * 3 + 1  # 2 budgets x (1 warmup + 2 timed), then the parity run
    pipe = Pipeline.load(tiny_uniform_dir)
    from tops_edge.bench.runner import build_prompt

    before, after = pipe.pre.split_ids(pipe.pre.prompt_text(build_prompt(pipe.pre.tokenizer, 8)[0]))
    assert peer.calls[0] == (before.tolist(), after.tolist(), 3)  # our token ids, as they are
    assert report["settings"]["gguf"] == str(tmp_path.resolve())
    p = report["peer"]
    assert p["n_ubatch"] == 256 and p["kv_type"] == "f16" and p["peak_rss_bytes"] == 123
    assert p["parity"]["decoder_tokens_equal"] is not None and p["tpot_limit_ms"] > 0
    for b in report["budgets"]:
        assert b["peer"]["vision_ms"]["median"] == 5.0 and b["peer"]["ratios"]["vision"]["median"] > 0
        assert b["limits"]["tpot_limit_ms"] > 0
    b576, b64 = report["budgets"]
    assert b576["limits"]["flop_ratio"] == 1.0 and b576["limits"]["prefill_ratio"] == 1.0
    assert 0 < b64["limits"]["flop_ratio"] < 1 and b64["limits"]["prefill_ratio"] is not None
    table = format_table(report)
    assert "llama.cpp" in table and "FLOP limit" in table and "parity" in table
    assert "ttft_ratio_median" in csv_text(report).splitlines()[0]


# --- with llama-cpp-python and a llama.cpp tree ---------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    src = os.environ.get("LLAMA_CPP_SRC")
    if not src:
        pytest.skip("LLAMA_CPP_SRC (llama-cpp-python's sdist or a llama.cpp tree) is not set")
    from tops_edge.export import export_model
    from tops_edge.models import load

    root = tmp_path_factory.mktemp("peer")
    export = export_model(load("tiny-llava"), root / "tiny", selector="uniform", keep=64, progress=False)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_llamacpp.py"), "convert", str(export),
                           "--out", str(root / "gguf"), "--llama-cpp", src], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return export, root / "gguf"


def test_llama_cpp_runs_the_same_decoder(tiny_gguf):
    export, gguf = tiny_gguf
    report = run_benchmark(export, keeps=[576, 64], runs=1, warmup=0, new_tokens=8, prompt_len=8,
                           compare="llama.cpp", gguf=gguf)
    validate(report)
    parity = report["peer"]["parity"]
    # llama.cpp's decoder fed our image embeddings greedy-decodes our tokens (fp32 weights, f16 KV)
    assert parity["decoder_tokens_equal"] == 8
    if report["peer"]["mtmd_lib"] != "bundled":  # libmtmd with the #25814 fix: the whole path agrees
        assert parity["image_embd_max_abs_diff"] < 1e-2 and parity["tokens_equal"] == 8
    assert all(b["peer"]["generated_tokens"] == [8] for b in report["budgets"])
