#!/usr/bin/env python
"""Plot a run's curves: one subplot per metric in RUN_DIR/metrics.jsonl, x = optimizer step, saved as a PNG.

    python tools/plot_run.py RUN_DIR [-o OUT.png]      (default OUT: RUN_DIR/curves.png)

metrics.jsonl holds one JSON object per line with `step` and scalar metrics ("loss", "train/kd", "lr", "eval/kl", ...);
eval metrics appear only on some lines and are drawn with markers. Needs matplotlib (`pip install matplotlib`, or the
`plot` extra of kd). Bad input: one line on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

# Let the script run from a source checkout without installing kd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from kd.metrics import read_metrics  # noqa: E402


def read_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """Series per metric key: {key: {step: value}}, numeric values only, from `kd.metrics.read_metrics` (a step
    logged twice keeps the later value; a cut last line is skipped with a warning)."""
    def warn(message: str) -> None:
        print(f"plot_run: warning: {message}", file=sys.stderr)

    records = read_metrics(run_dir, warn=warn)
    series: dict[str, dict[int, float]] = {}
    for step, record in records.items():
        for key, value in record.items():
            # bool is an int subclass; flags are not curves. null (a non-finite value) is a gap.
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    if not series:
        raise UserError(f"{run_dir} holds no numeric metrics to plot")
    return series


def _order(key: str) -> tuple[int, str]:
    """Loss first, then train/*, eval/*, anything else, and the learning rate last."""
    if key == "loss":
        return (0, key)
    if key == "lr":
        return (4, key)
    for rank, prefix in ((1, "train/"), (2, "eval/")):
        if key.startswith(prefix):
            return (rank, key)
    return (3, key)


def plot(series: dict[str, dict[int, float]], out: Path, title: str) -> None:
    """Draw one subplot per key in a grid of up to 3 columns and save it as a PNG at `out`."""
    try:
        import matplotlib
    except ImportError as err:
        raise UserError("plot_run.py needs matplotlib: pip install matplotlib (or install kd with the `plot` extra)") from err
    matplotlib.use("Agg")  # render to a file; no display needed (clusters, CI)
    import matplotlib.pyplot as plt

    keys = sorted(series, key=_order)
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps = sorted(series[key])
        values = [series[key][s] for s in steps]
        sparse = len(steps) < 50  # eval metrics come every N steps: show the points themselves
        ax.plot(steps, values, marker="o" if sparse else None, markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("-o", "--output", type=Path, help="PNG to write (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    out = args.output or args.run_dir / "curves.png"
    try:
        plot(read_series(args.run_dir), out, title=str(args.run_dir))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
