"""`tops-bench`: latency, throughput and memory of an exported model per visual-token budget.

    from tops_edge.bench import run_benchmark, format_table, write_json
    report = run_benchmark("out/tiny", keeps=[576, 128, 64], runs=5, warmup=1, compare="hf")
    print(format_table(report)); write_json(report, "bench.json")

The report is a dict laid out as `report.SCHEMA` documents (see tops_edge/bench/report.py).
"""

from .report import CSV_COLUMNS, SCHEMA, csv_text, format_table, validate, write_csv, write_json, write_plot
from .runner import BenchReport, default_keeps, parse_keeps, run_benchmark
from .stats import aggregate, median, percentile, summary, timed_calls

__all__ = [
    "BenchReport", "CSV_COLUMNS", "SCHEMA", "aggregate", "csv_text", "default_keeps", "format_table", "median",
    "parse_keeps", "percentile", "run_benchmark", "summary", "timed_calls", "validate", "write_csv", "write_json",
    "write_plot",
]
