"""The command-line contract: --json keys, --help, and one-line errors (no traceback) for bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tops_edge.cli import export_main, run_main
from tops_edge.runtime.pipeline import JSON_KEYS
from cli_helpers import EXAMPLE, one_line_error



def test_run_json_prints_exactly_the_documented_keys(tiny_uniform_dir, capsys):
    code = run_main([str(tiny_uniform_dir), "--image", str(EXAMPLE), "--prompt", "What shapes?", "--max-new-tokens", "5", "--json"])
    assert code == 0
    obj = json.loads(capsys.readouterr().out)
    assert tuple(obj) == JSON_KEYS
    assert len(obj["token_ids"]) == 5 and len(obj["kept_indices"]) == 64
    assert {"preprocess", "vision", "select", "prefill", "decode_per_token"} <= set(obj["timings_ms"])


def test_run_keep_flag_changes_budget_without_reexport(tiny_uniform_dir, capsys):
    run_main([str(tiny_uniform_dir), "--image", str(EXAMPLE), "--prompt", "Hi", "--max-new-tokens", "2", "--keep", "100", "--json"])
    assert len(json.loads(capsys.readouterr().out)["kept_indices"]) == 100


def test_run_plain_streams_text_and_prints_a_summary(tiny_uniform_dir, capsys):
    assert run_main([str(tiny_uniform_dir), "--image", str(EXAMPLE), "--prompt", "Hi", "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    assert "64/576 visual tokens" in captured.err


@pytest.mark.parametrize("main", [export_main, run_main])
def test_help_exits_zero(main, capsys):
    assert main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--keep", "0"], "out of range"),
        (["--keep", "577"], "out of range"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--max-new-tokens", "5000"], "context"),
        (["--temperature", "-1"], "temperature"),
        (["--backend", "trt"], "tensorrt"),
        (["--prompt", "no slot here", "--raw-prompt"], "image slot"),
        (["--prompt", "two <image> slots"], "<image>"),
    ],
)
def test_run_bad_arguments_fail_with_one_line(tiny_uniform_dir, capsys, args, needle):
    base = {"--prompt": "What shapes?"}
    argv = [str(tiny_uniform_dir), "--image", str(EXAMPLE)]
    if "--prompt" not in args:
        argv += ["--prompt", base["--prompt"]]
    line = one_line_error(capsys, run_main(argv + args))
    assert needle.lower() in line.lower()


def test_run_missing_image_fails_with_one_line(tiny_uniform_dir, tmp_path, capsys):
    line = one_line_error(capsys, run_main([str(tiny_uniform_dir), "--image", str(tmp_path / "nope.png"), "--prompt", "Hi"]))
    assert "does not exist" in line


def test_run_corrupt_image_fails_with_one_line(tiny_uniform_dir, tmp_path, capsys):
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(EXAMPLE.read_bytes()[:200])  # a PNG cut short
    line = one_line_error(capsys, run_main([str(tiny_uniform_dir), "--image", str(bad), "--prompt", "Hi"]))
    assert "cannot be decoded" in line


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_run_truncated_graph_fails_with_one_line(tiny_uniform_dir, tmp_path, capsys):
    d = _copy(tiny_uniform_dir, tmp_path / "copy")
    graph = d / "decoder.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    line = one_line_error(capsys, run_main([str(d), "--image", str(EXAMPLE), "--prompt", "Hi"]))
    assert "decoder.onnx" in line and "truncated" in line


def test_run_modified_graph_same_size_fails_on_hash(tiny_uniform_dir, tmp_path, capsys):
    d = _copy(tiny_uniform_dir, tmp_path / "copy")
    graph = d / "vision.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    line = one_line_error(capsys, run_main([str(d), "--image", str(EXAMPLE), "--prompt", "Hi"]))
    assert "sha256" in line


def test_run_manifest_from_another_schema_version_fails_with_one_line(tiny_uniform_dir, tmp_path, capsys):
    d = _copy(tiny_uniform_dir, tmp_path / "copy")
    manifest = json.loads((d / "manifest.json").read_text())
    manifest["schema_version"] = 999
    (d / "manifest.json").write_text(json.dumps(manifest))
    line = one_line_error(capsys, run_main([str(d), "--image", str(EXAMPLE), "--prompt", "Hi"]))
    assert "schema version 999" in line


def test_run_not_an_export_directory_fails_with_one_line(tmp_path, capsys):
    line = one_line_error(capsys, run_main([str(tmp_path), "--image", str(EXAMPLE), "--prompt", "Hi"]))
    assert "manifest.json" in line


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--model", "llava-v1.5-7b"], "llava-hf/llava-1.5-7b-hf"),  # alias -> hub id, not cached here
        (["--model", "tiny-llava", "--selector", "uniform", "--keep", "9999"], "out of range"),
        (["--model", "tiny-llava", "--keep", "64"], "--selector none keeps every"),
        (["--model", "tiny-llava", "--selector", "uniform", "--keep", "0"], "out of range"),
        (["--model", "tiny-llava", "--selector", "magic"], "invalid choice"),
        (["--model", "tiny-llava", "--precision", "int3"], "invalid choice"),
    ],
)
def test_export_bad_input_fails_with_one_line(tmp_path, capsys, argv, needle):
    line = one_line_error(capsys, export_main(argv + ["--out", str(tmp_path / "out"), "--quiet"]))
    assert needle in line
    assert not (tmp_path / "out").exists()


def test_failed_export_leaves_existing_directory_untouched(tiny, tmp_path, monkeypatch):
    from tops_edge.errors import ExportError
    from tops_edge.export import exporter, export_model

    out = export_model(tiny, tmp_path / "out", selector="uniform", keep=64, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = exporter.export_part

    def fail_on_decoder(part, *args, **kwargs):
        if part.name == "decoder":
            raise ExportError("simulated failure")
        return real(part, *args, **kwargs)

    monkeypatch.setattr(exporter, "export_part", fail_on_decoder)
    with pytest.raises(ExportError):
        export_model(tiny, out, selector="none", progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging directories left


def test_console_scripts_export_then_run_json(tmp_path):
    """The installed entry points, end to end, as a user calls them."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    exe = lambda name: str(bindir / name) if (bindir / name).exists() else shutil.which(name)  # noqa: E731
    out = tmp_path / "tiny"
    subprocess.run([exe("tops-export"), "--model", "tiny-llava", "--out", str(out), "--selector", "uniform", "--keep", "64"],
                   check=True, env=env, capture_output=True)
    proc = subprocess.run([exe("tops-run"), str(out), "--image", str(EXAMPLE), "--prompt", "What shapes?", "--max-new-tokens", "4", "--json"],
                          check=True, env=env, capture_output=True, text=True)
    assert tuple(json.loads(proc.stdout)) == JSON_KEYS


def test_every_command_takes_quiet():
    from tops_edge import cli

    for parser in (cli.export_parser, cli.run_parser, cli.bench_parser, cli.eval_parser, cli.build_parser):
        p = parser()
        assert "--quiet" in p._option_string_actions, p.prog


def test_quiet_export_and_run_print_only_the_answer(tiny_uniform_dir, tmp_path, capsys):
    """Off a terminal (as under CI) no progress bar is drawn; --quiet also drops the closing lines."""
    assert export_main(["--model", "tiny-llava", "--out", str(tmp_path / "q"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    assert export_main(["--model", "tiny-llava", "--out", str(tmp_path / "q")]) == 0
    assert capsys.readouterr().err.splitlines() == [f"exported tiny-llava -> {tmp_path / 'q'}"]
    assert run_main([str(tiny_uniform_dir), "--image", str(EXAMPLE), "--prompt", "Hi", "--max-new-tokens", "2",
                     "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and len(captured.out.splitlines()) == 1


def test_the_benchmark_ticks_its_progress_after_every_call_outside_the_timing():
    from tops_edge.bench.stats import timed_calls

    events = []
    ticks = iter(range(100))
    out = timed_calls(lambda: events.append("call"), warmup=1, runs=2, clock=lambda: next(ticks),
                      done=lambda: events.append(("tick", next(ticks))))  # a tick that reads the clock
    assert [e if e == "call" else e[0] for e in events] == ["call", "tick"] * 3
    assert [ms for _, ms in out] == [1e3, 1e3]  # a timed span is one clock step: the tick's read is outside it
