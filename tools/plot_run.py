#!/usr/bin/env python
"""Plot a run's curves from RUN_DIR/metrics.jsonl (x = optimizer step), or the held-out curves of several runs.

    python tools/plot_run.py RUN_DIR [-o OUT.png] [--all]      (default OUT: RUN_DIR/curves.png)
    python tools/plot_run.py --compare DIR [DIR ...] -o OUT.png

By default one panel per series a user reads: the loss and its terms (train/*), the held-out metrics (eval/*), the
learning rate, the gradient norm, the throughput (perf/tokens_per_s) and the loss's own state (taid/t, ...). Left
out, and listed under the figure: series that stay constant (e.g. lr without a schedule, eval/teacher_ppl,
train/skipped_steps = 0) with their value, series equal to one drawn before (train/<term> = loss for a one-term
loss, taid/J = loss then), and the details (the perf/* time split, train/loss_tokens, eval/tokens, and
eval/student_nll, which is log eval/student_ppl). ``--all`` draws every numeric series. A panel whose positive
values span a factor of 10 or more (perplexity, a gradient-norm spike) has a log y axis; sparse series (evals) are
drawn with markers.

``--compare`` draws held-out student NLL, KL(teacher || student) and top-1 agreement of several runs on one figure,
one line per DIR (legend: the directory name). A DIR without metrics.jsonl whose ``seed_*`` subdirectories are runs
(tools/compare_losses.py's DIR/<loss>) is one line: the mean over its seeds, with the min-max band shaded.

Needs matplotlib (`pip install matplotlib`, or the `plot` extra of kd). Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import math
import sys
import textwrap
from pathlib import Path
from typing import Optional

# Let the script run from a source checkout without installing kd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from kd.metrics import METRICS_FILE, read_metrics  # noqa: E402

Series = dict[str, dict[int, float]]  # {key: {step: value}}
# Shown only with --all: the time split of a step, token counts, and NLL (the log of the perplexity drawn already).
DETAIL_KEYS = ("train/loss_tokens", "eval/tokens", "eval/student_nll")
SHOWN_PERF = ("perf/tokens_per_s",)
COMPARE_KEYS = (("eval/student_nll", "held-out student NLL"), ("eval/kl", "held-out KL(teacher || student)"),
                ("eval/top1_agreement", "held-out top-1 agreement"))
LOG_SPAN = 100.0  # a log y axis once max / min reaches this (all values > 0): two decades


def read_series(run_dir: Path) -> Series:
    """Series per metric key: {key: {step: value}}, numeric values only, from `kd.metrics.read_metrics` (a step
    logged twice keeps the later value; a cut last line is skipped with a warning)."""
    def warn(message: str) -> None:
        print(f"plot_run: warning: {message}", file=sys.stderr)

    records = read_metrics(run_dir, warn=warn)
    series: Series = {}
    for step, record in records.items():
        for key, value in record.items():
            # bool is an int subclass; flags are not curves. null (a non-finite value) is a gap.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    if not series:
        raise UserError(f"{run_dir} holds no numeric metrics to plot")
    return series


def _order(key: str) -> tuple[int, str]:
    """Loss first, then train/*, eval/*, lr, grad_norm, perf/*, anything else (a loss's own state)."""
    if key == "loss":
        return (0, "")
    fixed = {"lr": 3, "grad_norm": 4}
    if key in fixed:
        return (fixed[key], key)
    for rank, prefix in ((1, "train/"), (2, "eval/"), (5, "perf/")):
        if key.startswith(prefix):
            return (rank, key)
    return (6, key)


def is_constant(values: list[float]) -> bool:
    """Two or more points, all equal up to a relative 1e-9 (a single point is a point, not a constant)."""
    return len(values) > 1 and max(values) - min(values) <= 1e-9 * max(abs(v) for v in values)


def wants_log(values: list[float]) -> bool:
    """Log y axis: every value positive and the largest at least LOG_SPAN times the smallest."""
    return bool(values) and min(values) > 0 and max(values) / min(values) >= LOG_SPAN


def select(series: Series, *, everything: bool = False) -> tuple[list[str], dict[str, dict]]:
    """(keys to draw in panel order, {"constant": {key: value}, "same": {key: other key}, "detail": {key: None}}).
    With `everything` every key is drawn and nothing is left out."""
    keys = sorted(series, key=_order)
    left_out: dict[str, dict] = {"constant": {}, "same": {}, "detail": {}}
    if everything:
        return keys, left_out
    shown: list[str] = []
    for key in keys:
        values = list(series[key].values())
        if is_constant(values):
            left_out["constant"][key] = values[0]
        elif key in DETAIL_KEYS or (key.startswith("perf/") and key not in SHOWN_PERF):
            left_out["detail"][key] = None
        elif (twin := next((k for k in shown if series[k] == series[key]), None)) is not None:
            left_out["same"][key] = twin
        else:
            shown.append(key)
    return shown, left_out


def left_out_note(left_out: dict[str, dict]) -> str:
    """One line per kind of series left out of the figure ('' when none)."""
    parts = []
    if left_out["constant"]:
        parts.append("constant: " + ", ".join(f"{k} = {v:.4g}" for k, v in left_out["constant"].items()))
    if left_out["same"]:
        parts.append("same as another panel: " + ", ".join(f"{k} = {v}" for k, v in left_out["same"].items()))
    if left_out["detail"]:
        parts.append("not drawn: " + ", ".join(left_out["detail"]))
    return "; ".join(parts) + ("  (--all draws every series)" if parts else "")


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise UserError("plot_run.py needs matplotlib: pip install matplotlib (or install kd with the `plot` extra)") from err
    matplotlib.use("Agg")  # render to a file; no display needed (clusters, CI)
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, panels: int, title: str, note: str, *, ncols: int = 3, width: float = 4.6, height: float = 3.0):
    """A figure of `panels` axes (constrained layout: the title, the panel titles and the note below never
    overlap) and the list of the axes in use."""
    ncols = min(ncols, panels)
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + (0.3 if note else 0)),
                             squeeze=False, layout="constrained")
    for ax in list(axes.flat)[panels:]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=12)
    if note:
        fig.supxlabel(textwrap.fill(note, width=int(width * ncols * 16)), fontsize=8, color="0.3")
    return fig, list(axes.flat)[:panels]


def _save(plt, fig, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def plot(series: Series, out: Path, title: str, *, everything: bool = False) -> dict[str, str]:
    """Draw one panel per selected key (3 columns) and save a PNG at `out`; returns {key drawn: "log" | "linear"}."""
    keys, left_out = select(series, everything=everything)
    if not keys:
        raise UserError(f"nothing to plot: every series is constant ({left_out_note(left_out)}); --all draws them")
    plt = _pyplot()
    fig, axes = _grid(plt, len(keys), title, left_out_note(left_out))
    scales = {}
    for ax, key in zip(axes, keys):
        steps = sorted(series[key])
        values = [series[key][s] for s in steps]
        log = wants_log(values)
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.2)
        if log:
            ax.set_yscale("log")
        scales[key] = ax.get_yscale()
        ax.set_title(key + (" (log scale)" if log else ""), fontsize=10)
        ax.grid(True, alpha=0.3, which="both" if log else "major")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
    _save(plt, fig, out)
    return scales


def plot_compare(groups: dict[str, list[Series]], out: Path, title: str) -> None:
    """Held-out curves of several runs on one figure: per label the mean over its runs (seeds) at the steps every
    run evaluated, the min-max band shaded when there are several. The top row shows whole runs; the bottom row the
    second half of training, where the losses differ by less than the first eval's fall would let one see."""
    plt = _pyplot()
    if any(len(runs) > 1 for runs in groups.values()):
        title += " (lines: mean over runs, shaded: min-max)"
    fig, axes = _grid(plt, 2 * len(COMPARE_KEYS), title, "", width=5.0, height=3.2)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    last = max((max(run[key]) for runs in groups.values() for run in runs for key, _ in COMPARE_KEYS if run.get(key)),
               default=0)
    for column, (key, name) in enumerate(COMPARE_KEYS):
        for ax, first in ((axes[column], 0), (axes[len(COMPARE_KEYS) + column], last / 2)):
            drawn: list[float] = []
            for index, (label, runs) in enumerate(groups.items()):
                steps = sorted(s for s in set.intersection(*(set(run.get(key, {})) for run in runs)) if s >= first)
                if not steps:
                    continue
                per_step = [[run[key][s] for run in runs] for s in steps]
                mean = [sum(v) / len(v) for v in per_step]
                color = colors[index % len(colors)]
                legend = label if len(runs) == 1 else f"{label} (mean of {len(runs)})"
                ax.plot(steps, mean, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.4,
                        color=color, label=legend)
                if len(runs) > 1:
                    ax.fill_between(steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color,
                                    alpha=0.2, linewidth=0)
                drawn.extend(v for values in per_step for v in values)
            log = wants_log(drawn)
            if log:
                ax.set_yscale("log")
            part = "" if first == 0 else f", steps {math.ceil(first)}-{last}"
            ax.set_title(name + part + (" (log scale)" if log else ""), fontsize=10)
            ax.grid(True, alpha=0.3, which="both" if log else "major")
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=8)
            if drawn and first == 0:
                ax.legend(fontsize=7)
    _save(plt, fig, out)


def compare_group(path: Path) -> list[Series]:
    """The runs of one --compare DIR: DIR itself, or its seed_* subdirectories holding metrics.jsonl."""
    if (path / METRICS_FILE).is_file():
        return [read_series(path)]
    seeds = sorted(p for p in path.glob("seed_*") if (p / METRICS_FILE).is_file())
    if not seeds:
        raise UserError(f"{path} holds neither {METRICS_FILE} nor seed_*/{METRICS_FILE}")
    return [read_series(p) for p in seeds]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", help="run directory holding metrics.jsonl")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")
    parser.add_argument("--all", action="store_true", help="draw every numeric series, constants included")
    parser.add_argument("--compare", type=Path, nargs="+", metavar="DIR", help="held-out curves of these runs")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.compare is None):
        parser.error("give either RUN_DIR or --compare DIR [DIR ...]")
    if args.compare is not None and args.output is None:
        parser.error("--compare needs -o OUT.png")
    out = args.output or args.run_dir / "curves.png"
    try:
        if args.compare is not None:
            plot_compare({p.name or str(p): compare_group(p) for p in args.compare}, out,
                         title="held-out metrics")
        else:
            plot(read_series(args.run_dir), out, title=str(args.run_dir), everything=args.all)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
