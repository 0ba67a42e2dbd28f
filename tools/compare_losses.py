#!/usr/bin/env python
"""Train one recipe with several losses for the same steps and print their final held-out metrics side by side.

    python tools/compare_losses.py RECIPE [key=value ...] [--losses ce forward_kl taid] [--out DIR] [--nproc N]
    python tools/compare_losses.py RECIPE --losses ce forward_kl taid --out DIR --no-train   (table only)

Each loss runs as ``kd train RECIPE run.output_dir=DIR/<loss> loss.name=<loss> resume=never [key=value ...]``, one
after the other, so every run sees the same models, data order, steps and evaluation; only the loss differs (the
recipe's other loss knobs apply to every run, e.g. loss.temperature; ``ce`` ignores them). The table has one row per
loss from the *last* eval record of its run's metrics.jsonl (held-out student NLL and perplexity, KL(teacher ||
student) at T = 1, top-1 agreement) plus the step-0 row (the student before training) when the runs evaluated at
the start. ``--json`` prints the rows as JSON instead of a Markdown table.

Bad input (missing recipe, a run without eval records): one line on stderr, exit code 2. A failing training run
stops the comparison with its exit code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

# Let the script run from a source checkout without installing kd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from kd.metrics import METRICS_FILE, read_metrics  # noqa: E402

COLUMNS = [  # (metrics.jsonl key, table header, format)
    ("eval/student_nll", "student NLL", "{:.4f}"),
    ("eval/student_ppl", "student ppl", "{:.2f}"),
    ("eval/kl", "KL(teacher||student)", "{:.4f}"),
    ("eval/top1_agreement", "top-1 agree", "{:.3f}"),
]


def run_dir_name(loss: str) -> str:
    """A directory name for a loss name or dotted path (``pkg.mod.Class`` -> ``pkg.mod.Class``; odd chars -> _)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", loss)


def last_eval(run_dir: Path) -> tuple[Optional[dict], dict]:
    """(the step-0 eval record or None, the eval record of the highest step) from a run's metrics.jsonl
    (read by `kd.metrics.read_metrics`: a step logged twice keeps the later values, a cut last line is skipped)."""
    path = str(run_dir / METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError("not found: train the run first (leave out --no-train)", file=path)
    evals = {step: {"step": step, **record} for step, record in read_metrics(run_dir).items() if "eval/kl" in record}
    if not evals:
        raise UserError("holds no eval records (eval/kl); the run must evaluate at its end", file=path)
    return evals.get(0), evals[max(evals)]


def table_rows(out_dir: Path, losses: list[str]) -> list[dict]:
    """One row per loss (its final eval), preceded by the step-0 row of the first run that has one."""
    rows, start = [], None
    for loss in losses:
        first, final = last_eval(out_dir / run_dir_name(loss))
        if start is None and first is not None:
            start = {"loss": "(student before training)", "step": 0, **{k: first.get(k) for k, _, _ in COLUMNS}}
        rows.append({"loss": loss, "step": int(final["step"]), **{k: final.get(k) for k, _, _ in COLUMNS}})
    return ([start] if start is not None else []) + rows


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (paste-ready for the README)."""
    def cell(value, fmt: str) -> str:
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)

    header = ["loss", "steps", *[title for _, title, _ in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row["loss"], str(row["step"]), *[cell(row[k], fmt) for k, _, fmt in COLUMNS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def train_command(recipe: str, loss: str, out_dir: Path, overrides: list[str], nproc: Optional[int]) -> list[str]:
    """The `kd train` command of one loss's run (overrides given by the user come last, so they win)."""
    cmd = [sys.executable, "-m", "kd.cli", "train", recipe, f"run.output_dir={out_dir / run_dir_name(loss)}",
           f"loss.name={loss}", "resume=never", *overrides]
    return cmd + (["--nproc", str(nproc)] if nproc else [])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value, applied to every run (e.g. train.max_steps=40)")
    parser.add_argument("--losses", nargs="+", default=["ce", "forward_kl", "taid"], help="loss.name of each run")
    parser.add_argument("--out", default="runs/compare_losses", help="parent directory of the runs (one per loss)")
    parser.add_argument("--nproc", type=int, default=None, help="processes per run (default: the recipe's run.nproc)")
    parser.add_argument("--no-train", action="store_true", help="only print the table from existing runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides = [*args.overrides, *extra]  # overrides may come after the --flags too
    out_dir = Path(args.out)
    try:
        if not Path(args.recipe).is_file():
            raise UserError(f"recipe {args.recipe} not found")
        if len(set(map(run_dir_name, args.losses))) != len(args.losses):
            raise UserError(f"--losses names the same run twice: {' '.join(args.losses)}")
        if not args.no_train:
            for loss in args.losses:
                cmd = train_command(args.recipe, loss, out_dir, args.overrides, args.nproc)
                print(f"compare_losses: {shlex.join(['kd', *cmd[4:]])}", file=sys.stderr, flush=True)
                code = subprocess.call(cmd)
                if code != 0:
                    print(f"compare_losses: the {loss} run failed (exit {code})", file=sys.stderr)
                    return code
        rows = table_rows(out_dir, args.losses)
    except UserError as err:
        print(f"compare_losses: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        again = shlex.join(["python", "tools/compare_losses.py", args.recipe, *args.overrides, "--losses",
                            *args.losses, "--out", str(out_dir)] + (["--nproc", str(args.nproc)] if args.nproc else []))
        print(f"Held-out metrics after training (reproduce: `{again}`):\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
