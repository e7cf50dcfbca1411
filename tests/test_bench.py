"""tops-bench: statistics on known inputs, aggregation on synthetic timings (no real clock), the JSON
schema and CSV of a tiny real run, --compare hf, and one-line errors. No timing assertions."""

from __future__ import annotations

import csv
import json
import os
import sys
from types import SimpleNamespace

import pytest

from tops_edge.bench import (
    CSV_COLUMNS, SCHEMA, aggregate, median, parse_keeps, percentile, run_benchmark, summary, timed_calls, validate,
)
from tops_edge.bench import device as bench_device
from tops_edge.bench.report import short_label, write_atomic
from tops_edge.bench.runner import build_prompt
from tops_edge.cli import bench_main
from tops_edge.errors import InputError
from cli_helpers import one_line_error


# --- statistics ---------------------------------------------------------------------------------
def test_median_and_p90_on_known_inputs():
    assert median([3, 1, 2]) == 2
    assert median([4, 1, 3, 2]) == 2.5
    assert percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == pytest.approx(9.1)  # numpy's linear rule
    assert percentile([10, 20], 90) == pytest.approx(19.0)
    assert percentile([7.5], 90) == 7.5
    assert percentile([5, 1, 9], 0) == 1 and percentile([5, 1, 9], 100) == 9
    assert summary([1, 2, 3, 4, 5, 6, 7, 8, 9, 10]) == {"median": 5.5, "p90": 9.1}
    with pytest.raises(ValueError):
        percentile([], 50)


def test_timed_calls_uses_the_clock_and_skips_warmup():
    ticks = iter([0.0, 0.010, 1.0, 1.030, 2.0, 2.002])
    calls = []
    out = timed_calls(lambda: calls.append(1) or len(calls), warmup=2, runs=3, clock=lambda: next(ticks))
    assert len(calls) == 5
    assert [r for r, _ in out] == [3, 4, 5]
    assert [round(ms, 6) for _, ms in out] == [10.0, 30.0, 2.0]


def fake_result(pre, vis, sel, pre_fill, tpot, n_tokens, kv=1000, finish="length"):
    return SimpleNamespace(
        timings_ms={"preprocess": pre, "vision": vis, "select": sel, "prefill": pre_fill, "decode_per_token": tpot,
                    "total": 0.0},
        token_ids=list(range(n_tokens)), kv_cache_bytes=kv, prompt_tokens=100, finish_reason=finish,
        stages=[{"layer": 0, "keep": 64, "kept_indices": list(range(64))}], segment_prefill_ms=[pre_fill],
        segment_kv_bytes=[kv],
    )


def test_aggregate_per_stage_from_synthetic_timings():
    samples = [
        (fake_result(1, 10, 2, 20, 4.0, 5), 60.0),
        (fake_result(3, 30, 2, 40, 2.0, 5), 100.0),
        (fake_result(2, 20, 2, 30, 1.0, 3, finish="eos"), 80.0),  # stopped at EOS: 2 decode steps
    ]
    agg = aggregate(samples)
    assert agg["preprocess_ms"] == {"median": 2.0, "p90": 2.8}
    assert agg["vision_ms"]["median"] == 20.0 and agg["select_ms"] == {"median": 2.0, "p90": 2.0}
    assert agg["ttft_ms"]["median"] == 54.0  # 33, 75, 54 -> median 54
    assert agg["ttft_ms"]["p90"] == pytest.approx(70.8)
    assert agg["tpot_ms"]["median"] == 2.0
    # real counts: 4 + 4 + 2 decode steps over 16 + 8 + 2 ms
    assert agg["decode_tok_s"] == pytest.approx(10 / 0.026, rel=1e-4)
    assert agg["e2e_ms"] == {"median": 80.0, "p90": 96.0}
    assert agg["generated_tokens"] == [5, 5, 3] and agg["finish_reasons"] == ["length", "length", "eos"]
    assert agg["kv_cache_bytes"] == 1000 and agg["prompt_tokens"] == 100


def test_aggregate_without_decode_steps():
    agg = aggregate([(fake_result(1, 1, 1, 1, 0.0, 1, finish="eos"), 5.0)])
    assert agg["tpot_ms"] is None and agg["decode_tok_s"] is None
    with pytest.raises(ValueError):
        aggregate([])


def test_parse_keeps():
    assert parse_keeps("576, 192,128,64,64") == [576, 192, 128, 64]
    for bad in ("abc", "0", "-3", "64,", "", "1.5"):
        with pytest.raises(InputError):
            parse_keeps(bad)


def test_validate_names_the_bad_key():
    with pytest.raises(ValueError, match="missing key 'settings'"):
        validate({"schema": "x", "created_utc": "t", "directory": "d"})
    with pytest.raises(ValueError, match="median"):
        validate({"median": "fast", "p90": 1.0}, {"median": float, "p90": float})
    with pytest.raises(ValueError):
        validate(True, int)  # a bool is not a count


def test_build_prompt_is_about_the_asked_length(pipe_uniform):
    text, n = build_prompt(pipe_uniform.pre.tokenizer, 40)
    assert text and abs(n - 40) <= 2


def test_jetson_power_mode_absent_or_failing(monkeypatch, tmp_path):
    monkeypatch.setattr(bench_device.shutil, "which", lambda name: None)
    assert bench_device.jetson_power_mode() is None
    fake = tmp_path / "nvpmodel"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(bench_device.shutil, "which", lambda name: str(fake))
    assert bench_device.jetson_power_mode() is None


def test_write_atomic_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    write_atomic(path, "new")
    assert path.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


# --- a tiny real run ----------------------------------------------------------------------------
def test_cli_run_writes_json_and_csv_by_the_schema(tiny_uniform_dir, tmp_path, capsys):
    js, cs = tmp_path / "bench.json", tmp_path / "bench.csv"
    code = bench_main([str(tiny_uniform_dir), "--keep", "576,64", "--runs", "2", "--warmup", "1", "--new-tokens", "4",
                       "--prompt-len", "16", "--json", str(js), "--csv", str(cs), "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(js.read_text())
    validate(report)
    assert set(report) == set(SCHEMA)
    assert [b["keep"] for b in report["budgets"]] == [576, 64]
    b576, b64 = report["budgets"]
    assert b64["kv_cache_bytes"] < b576["kv_cache_bytes"]
    assert b64["prompt_tokens"] == b576["prompt_tokens"] - 512
    for b in report["budgets"]:
        assert len(b["generated_tokens"]) == 2 and all(1 <= n <= 4 for n in b["generated_tokens"])
        assert b["hf_e2e_ratio"] is None
    assert report["hf"] is None
    assert report["device"]["logical_cores"] >= 1 and report["device"]["selector"] == "uniform"
    assert report["settings"]["runs"] == 2 and report["settings"]["new_tokens"] == 4
    with open(cs, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == CSV_COLUMNS and len(rows) == 3
    assert [int(r[0]) for r in rows[1:]] == [576, 64]
    assert "576" in out and "TTFT" in out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_compare_hf_gives_a_ratio_per_budget(tiny_uniform_dir):
    report = run_benchmark(tiny_uniform_dir, keeps=[576, 64], runs=1, warmup=0, new_tokens=3, prompt_len=8, compare="hf")
    validate(report)
    assert report["hf"]["generated_tokens"] == [3]  # min_new_tokens: HF always makes exactly T
    assert report["hf"]["config_matches_export"] is True
    assert all(isinstance(b["hf_e2e_ratio"], float) for b in report["budgets"])


def test_plot_writes_a_png(tiny_uniform_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "b.png"
    assert bench_main([str(tiny_uniform_dir), "--keep", "576,64", "--runs", "1", "--warmup", "0", "--new-tokens", "2",
                       "--plot", str(png), "--quiet"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad input: one line, non-zero, no traceback ------------------------------------------------
@pytest.mark.parametrize("args, needle", [
    (["--keep", "abc"], "--keep"),
    (["--keep", "0"], "--keep"),
    (["--keep", "576,9999"], "out of range"),
    (["--runs", "0"], "--runs"),
    (["--warmup", "-1"], "--warmup"),
    (["--new-tokens", "0"], "--new-tokens"),
    (["--json", "/nonexistent-dir/x.json"], "cannot write"),
    (["--csv", "/proc/x.csv"], "cannot write"),
    (["--image", "/nonexistent.png"], "does not exist"),
    (["--compare", "vllm"], "invalid choice"),
])
def test_bad_input_is_one_line(tiny_uniform_dir, capsys, args, needle):
    base = [str(tiny_uniform_dir), "--runs", "1", "--warmup", "0", "--new-tokens", "1", "--quiet"]
    line = one_line_error(capsys, bench_main(base + args))  # argparse: a repeated flag's last value wins
    assert line.startswith("tops-bench: ") and needle in line


def test_missing_dir_is_one_line(tmp_path, capsys):
    line = one_line_error(capsys, bench_main([str(tmp_path / "nope")]))
    assert "not a directory" in line


def test_budget_below_n_without_selector_is_one_line(tiny_none_dir, capsys):
    line = one_line_error(capsys, bench_main([str(tiny_none_dir), "--keep", "576,64", "--quiet"]))
    assert "no selector" in line


def test_plot_without_matplotlib_is_one_line(tiny_uniform_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    line = one_line_error(capsys, bench_main([str(tiny_uniform_dir), "--plot", str(tmp_path / "p.png"), "--quiet"]))
    assert "matplotlib" in line
    assert not os.path.exists(tmp_path / "p.png")


def test_orchestration_overhead_is_wall_time_outside_preprocessing_and_sessions():
    runs = []
    for wall, pre, busy in [(110.0, 10.0, 95.0), (60.0, 5.0, 50.0), (220.0, 20.0, 190.0)]:
        r = fake_result(pre, 1, 1, 1, 1.0, 3)
        r.timings_ms["sessions"] = busy
        runs.append((r, wall))
    agg = aggregate(runs)
    # (110-10-95)/95, (60-5-50)/50, (220-20-190)/190 -> 5.263%, 10%, 5.263%
    assert agg["overhead_pct"]["median"] == pytest.approx(100 * 5 / 95, abs=1e-3)
    assert agg["sessions_ms"]["median"] == 95.0


def test_pipeline_reports_time_inside_its_sessions(pipe_uniform, images):
    r = pipe_uniform.generate(images["wide"], "Hi", max_new_tokens=4, keep=64)
    stages = sum(r.timings_ms[k] for k in ("vision", "select", "prefill"))
    assert 0 < r.timings_ms["sessions"] <= r.timings_ms["total"]
    assert r.timings_ms["sessions"] <= stages + 3 * r.timings_ms["decode_per_token"] + 1e-6


def test_plot_titles_name_a_local_model_by_its_directory(tmp_path):
    """Figures are committed: a title shows the model's directory name, never the machine's layout."""
    assert short_label(str(tmp_path / "shapes-llava")) == "shapes-llava"
    assert short_label("./runs/model") == "model"
    assert short_label("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert short_label("tiny-llava") == "tiny-llava"
