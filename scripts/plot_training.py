"""The training curve per question type: validation accuracy of each ShapesVQA type against stage-2
steps, from a training run's log.jsonl (scripts/train_shapes_llava.py appends to it across resumes).

  python scripts/plot_training.py runs/shapes/log.jsonl --out curve.png [--json curve.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def curves(log_path) -> dict[str, list[tuple[int, float]]]:
    """{type: [(lm step, val accuracy), ...]} in step order; a step logged twice (a resume's first
    evaluation repeats its checkpoint's last) keeps its last reading."""
    by_step: dict[int, dict] = {}
    for line in Path(log_path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "lm" and "val" in rec:
            by_step[int(rec["step"])] = rec["val"]
    out: dict[str, list[tuple[int, float]]] = {}
    for step in sorted(by_step):
        for qtype, acc in by_step[step].items():
            out.setdefault(qtype, []).append((step, acc))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("log", help="a training run's log.jsonl")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--json", default=None, help="also write the curves as JSON")
    args = p.parse_args(argv)
    from tops_edge.bench.report import require_matplotlib, write_atomic

    require_matplotlib()
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = curves(args.log)
    if not data:
        print(f"plot_training: {args.log} has no validation records", file=sys.stderr)
        return 1
    fig, ax = plt.subplots(figsize=(7, 4))
    for qtype, points in data.items():
        ax.plot([s for s, _ in points], [100 * a for _, a in points], marker=".", label=qtype)
    ax.axhline(90, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("stage-2 step (batch 16, tower frozen)")
    ax.set_ylabel("val accuracy % (first answer token)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(args.out, buf.getvalue())
    if args.json:
        write_atomic(args.json, (json.dumps(data, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
