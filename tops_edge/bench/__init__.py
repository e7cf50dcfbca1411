"""`tops-bench`: latency, throughput and memory of an exported model per visual-token budget.

    from tops_edge.bench import run_benchmark, format_table, write_json
    report = run_benchmark("out/tiny", keeps=[576, 128, 64], runs=5, warmup=1, compare="hf")
    print(format_table(report)); write_json(report, "bench.json")

`compare="llama.cpp", gguf=DIR` runs llama.cpp (the `[peer]` extra) on the GGUFs that
scripts/compare_llamacpp.py converts, alternately with ours (bench/llamacpp.py); every report carries
the limits beside its figures (bench/limits.py: FLOP-limit prefill ratio, weight-read TPOT limit).

The report is a dict laid out as `report.SCHEMA` documents (see tops_edge/bench/report.py).
"""

from .report import CSV_COLUMNS, SCHEMA, csv_text, format_table, validate, write_csv, write_json, write_plot
from .limits import DecoderShape, decode_limit_ms, memory_bandwidth, prefill_flops
from .runner import BenchReport, default_keeps, parse_keeps, run_benchmark
from .stats import aggregate, median, percentile, summary, timed_calls

__all__ = [
    "BenchReport", "CSV_COLUMNS", "DecoderShape", "SCHEMA", "aggregate", "decode_limit_ms", "memory_bandwidth",
    "prefill_flops", "csv_text", "default_keeps", "format_table", "median",
    "parse_keeps", "percentile", "run_benchmark", "summary", "timed_calls", "validate", "write_csv", "write_json",
    "write_plot",
]
