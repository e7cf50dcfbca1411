"""The `tops-eval` report: JSON schema, terminal table and PNG plot.

JSON schema ("tops-eval/1"). A Cell is {n int, correct int, accuracy float, accuracy_ci95 [lo, hi]
(Wilson)} and, for pruned runs, relative float|null (correct / unpruned correct on the same items)
and relative_ci95 [lo, hi]|null (paired bootstrap, 1000 resamples):

    schema        "tops-eval/1"
    created_utc   str
    directory     str            the export evaluated
    model_source  str
    task          str            "shapesvqa", "shapesvqa-dense" or the JSONL path
    settings      {keeps [int], selectors [str] (each a name or a spec with parameters, e.g.
                   "tops:stages=1"), items int, skip int (items skipped before the first: --skip),
                   max_new_tokens int, budget str, positions str
                   ("compact" | "original"), split str|null (ShapesVQA: "test" | "val"),
                   num_visual_tokens int}
    elapsed_s     float
    categories    [str]          question types (ShapesVQA) or the JSONL's categories
    table         {"unpruned": {"all": Cell, <category>: Cell, ...},
                   <selector>: {"<keep>": {"all": Cell, <category>: Cell, ...}, ...}, ...}
    unreachable   {<selector>: {"<keep>": str (why: the plan's one-line error)}}: budgets a row's
                   plan cannot reach (e.g. fastv at layer 2 below its smallest average); they have
                   no table, agreement or versus cell
    agreement     {<selector>: {"<keep>": {n int, top1 float (share of items whose most likely first
                   answer token is the unpruned run's), top1_ci95 [lo, hi] (Wilson), kl float (mean
                   over items of KL(unpruned || pruned) of the first answer token's distribution, in
                   nats), kl_ci95 [lo, hi] (bootstrap), kl_median float}}}; pruned budgets only,
                   all items
    versus        {reference str (the first selector), against {<selector>: {"<keep>": {diff float
                   (reference accuracy - this selector's, all items), diff_ci95 [lo, hi] (paired
                   bootstrap), wins int (items the reference got right and this one wrong), losses
                   int (the reverse), p_mcnemar float (exact, two-sided), kl_diff float (reference
                   mean KL - this selector's; < 0: the reference is closer to unpruned), kl_diff_ci95
                   [lo, hi] (paired bootstrap), kl_lower / kl_higher float (shares of items where the
                   reference's KL is the lower / the higher), p_sign float (exact two-sided sign
                   test on those two counts)}}}}; pruned budgets only
    examples      [{question, answer [str], category, "<selector>@<keep>": prediction, ...}] (first 20)
"""

from __future__ import annotations

import json
from pathlib import Path

from ..bench.report import check_writable, require_matplotlib, short_label, write_atomic


def format_table(report: dict) -> str:
    cats = ["all", *report["categories"]]
    width = max(12, *(len(c) for c in cats))
    name = max(10, *(len(m) for m in report["settings"]["selectors"]))
    header = f"{'selector':<{name}} {'K':>5}  " + "  ".join(f"{c:>{width}}" for c in cats)
    lines = [
        f"{report['task']} on {report['model_source']}: {report['settings']['items']} items; "
        f"accuracy % (relative to unpruned %), 95% CI in the JSON",
        header,
    ]
    full = report["table"]["unpruned"]
    lines.append(f"{'unpruned':<{name}} {report['settings']['num_visual_tokens']:>5}  "
                 + "  ".join(f"{100 * full[c]['accuracy']:>{width}.1f}" for c in cats))
    unreachable = report.get("unreachable") or {}
    for method in report["settings"]["selectors"]:
        for keep in report["settings"]["keeps"]:
            if str(keep) in unreachable.get(method, {}):
                lines.append(f"{method:<{name}} {keep:>5}  unreachable: {unreachable[method][str(keep)]}")
                continue
            row = report["table"][method][str(keep)]
            cells = []
            for c in cats:
                rel = row[c].get("relative")
                text = f"{100 * row[c]['accuracy']:.1f} ({'-' if rel is None else f'{100 * rel:.0f}'})"
                cells.append(f"{text:>{width}}")
            lines.append(f"{method:<{name}} {keep:>5}  " + "  ".join(cells))
    agreement = report.get("agreement") or {}
    if agreement:
        lines.append("agreement with the unpruned model on the first answer token, all items: "
                     "top-1 agreement %, mean KL(unpruned || pruned) in nats [95% CI], median KL")
        for method, per_keep in agreement.items():
            for keep, a in per_keep.items():
                lo, hi = a["kl_ci95"]
                lines.append(f"  {method:<{name}} {keep:>5}  {100 * a['top1']:5.1f}  {a['kl']:.4f} [{lo:.4f}, {hi:.4f}]"
                             f"  {a['kl_median']:.2e}")
    against = (report.get("versus") or {}).get("against") or {}
    if against:
        ref = report["versus"]["reference"]
        kl = any("kl_diff" in d for per_keep in against.values() for d in per_keep.values())
        lines.append(f"{ref} against each selector on all items: accuracy difference in points [95% CI], "
                     f"items only {ref} / only the other got right, McNemar p"
                     + (f"; mean KL difference [95% CI], % of items where {ref}'s KL is lower / higher, "
                        f"sign test p" if kl else ""))
        for method, per_keep in against.items():
            for keep, d in per_keep.items():
                lo, hi = d["diff_ci95"]
                line = (f"  {method:<{name}} {keep:>5}  {100 * d['diff']:+5.1f} [{100 * lo:+5.1f}, {100 * hi:+5.1f}]"
                        f"  {d['wins']:>4} / {d['losses']:<4}  p = {d['p_mcnemar']:<9.3g}")
                if "kl_diff" in d:
                    klo, khi = d["kl_diff_ci95"]
                    line += (f"  KL {d['kl_diff']:+.4f} [{klo:+.4f}, {khi:+.4f}]  {100 * d['kl_lower']:.0f} / "
                             f"{100 * d['kl_higher']:.0f}%  p = {d['p_sign']:.3g}")
                lines.append(line.rstrip())
    return "\n".join(lines)


def write_json(report: dict, path) -> None:
    write_atomic(path, (json.dumps(report, indent=2) + "\n").encode())


def write_plot(report: dict, path) -> None:
    """Relative accuracy (all items) against kept tokens, one line per selector, with 95% bands; with
    the report's `agreement`, a second panel of the mean KL to the unpruned model."""
    require_matplotlib()
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keeps = report["settings"]["keeps"]
    agreement = report.get("agreement") or {}
    if agreement:
        fig, (ax, ax_kl) = plt.subplots(1, 2, figsize=(11.0, 4.2), dpi=120)
        _plot_kl(ax_kl, report, agreement)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for method in report["settings"]["selectors"]:
        reached = [k for k in keeps if str(k) in report["table"].get(method, {})]  # unreachable budgets: no point
        if not reached:
            continue
        rows = [report["table"][method][str(k)]["all"] for k in reached]
        rel = [100 * (r["relative"] or 0.0) for r in rows]
        ax.plot(reached, rel, marker="o", label=method)
        cis = [r.get("relative_ci95") for r in rows]
        if all(cis):
            ax.fill_between(reached, [100 * c[0] for c in cis], [100 * c[1] for c in cis], alpha=0.12)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    _kept_tokens_axis(ax, keeps, report)
    ax.set_ylabel("accuracy relative to unpruned (%)")
    settings = report["settings"]
    sample = f"{settings['split']}, " if settings.get("split") else ""
    ax.set_title(f"{short_label(report['task'])} ({sample}{settings['items']} items): {short_label(report['model_source'])}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_atomic(path, buf.getvalue())


def _plot_kl(ax, report: dict, agreement: dict) -> None:
    """Mean KL(unpruned || pruned) of the first answer token against kept tokens (pruned budgets;
    log scale), one line per selector, with 95% bands."""
    for method in report["settings"]["selectors"]:
        cells = sorted(((int(k), c) for k, c in agreement.get(method, {}).items()), key=lambda kc: kc[0])
        if not cells:
            continue
        keeps = [k for k, _ in cells]
        ax.plot(keeps, [c["kl"] for _, c in cells], marker="o", label=method)
        ax.fill_between(keeps, [c["kl_ci95"][0] for _, c in cells], [c["kl_ci95"][1] for _, c in cells], alpha=0.12)
    ax.set_yscale("log")
    _kept_tokens_axis(ax, sorted({int(k) for per in agreement.values() for k in per}), report)
    ax.set_ylabel("mean KL(unpruned || pruned), nats (lower is closer)")
    ax.set_title("agreement with the unpruned model (first answer token)", fontsize=9)
    ax.grid(alpha=0.3, which="both")


def _kept_tokens_axis(ax, keeps, report: dict) -> None:
    """The x axis both panels share (kept tokens, log 2, a tick per budget) and the legend."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(keeps)
    ax.set_xticklabels([str(k) for k in keeps])
    ax.set_xlabel(f"visual tokens kept (of {report['settings']['num_visual_tokens']})")
    ax.legend(fontsize=8)


__all__ = ["format_table", "write_json", "write_plot", "check_writable"]
