#!/usr/bin/env python
"""Train one recipe with several losses and seeds for the same steps; print their final held-out metrics side by side.

    python tools/compare_losses.py RECIPE [key=value ...] [--losses ce forward_kl taid] [--seeds 0 1] [--out DIR]
                                   [--nproc N] [--plot OUT.png] [--no-train] [--json]

Each (loss, seed) is one run in ``DIR/<loss>/seed_<s>/``, trained one after the other as
``kd train RECIPE run.output_dir=DIR/<loss>/seed_<s> loss.name=<loss> train.seed=<s> resume=auto [key=value ...]``,
so every run sees the same models, data, steps and evaluation; only the loss (and the seed) differ. The recipe's
other loss knobs apply to every run (e.g. loss.temperature; ``ce`` ignores them). ``--seeds`` defaults to the
recipe's train.seed.

**Resumable.** Re-running the same command continues where it stopped: a run whose metrics.jsonl holds the eval of
its final step (train.max_steps of the recipe as this command resolves it) is finished and skipped; any other run
is handed to ``kd train ... resume=auto``, which continues it exactly from its newest complete checkpoint (or starts
it when it has none). Every run has its own directory, so no run's resume identity (kd refuses a checkpoint of
another loss or train.seed) ever changes. A finished run whose recorded recipe (its recipe.yaml) differs from the
requested one in what kd's resume checks (models, data, loss, train.seed) is an error, not a stale table row. With
``train.epochs`` the final step depends on the data, so the tool cannot tell: every run goes to ``kd train`` (a
finished run returns after its start-up) and the table takes each run's last eval. Ctrl-C reaches kd's ranks too (they
save a checkpoint, as on any SIGINT); the tool waits for `kd train` to return instead of killing it, then stops; run
the command again to continue.

One progress line per run on stderr (skipped / training from step N / done, with time and an estimate of what is
left), then a Markdown table: one row per loss from the final eval of its finished runs (held-out student NLL and
perplexity, KL(teacher || student) at T = 1, top-1 agreement), each cell the mean over seeds followed by
(min–max) when there are several, plus the step-0 row (the student before training) when the runs evaluated at
the start. ``--no-train`` prints the table from whatever exists (unfinished runs are listed, not averaged).
``--json`` prints the rows as JSON (per-seed values, mean, min, max and sample std). ``--plot OUT.png`` draws the
held-out NLL, KL and top-1 curves of every loss on one figure (tools/plot_run.py: mean over seeds, min-max band).

Bad input (missing recipe, an override of what the tool sets itself, a run without eval records): one line on
stderr, exit code 2. A failing training run stops the comparison with its exit code.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

# Let the script run from a source checkout without installing kd.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.config.loader import dump_recipe, load_recipe  # noqa: E402
from kd.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from kd.metrics import METRICS_FILE, read_metrics  # noqa: E402

COLUMNS = [  # (metrics.jsonl key, table header, format)
    ("eval/student_nll", "student NLL", "{:.4f}"),
    ("eval/student_ppl", "student ppl", "{:,.1f}"),
    ("eval/kl", "KL(teacher ‖ student)", "{:.4f}"),
    ("eval/top1_agreement", "top-1 agree", "{:.3f}"),
]
EVAL_KEY = "eval/kl"  # a record holding it is an eval record
SET_BY_TOOL = ("run.output_dir", "loss.name", "train.seed", "resume")  # per-run overrides the user must not give


def run_dir_name(loss: str) -> str:
    """A directory name for a loss name or dotted path (``pkg.mod.Class`` -> ``pkg.mod.Class``; odd chars -> _)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", loss)


@dataclass(frozen=True)
class Run:
    loss: str
    seed: int
    dir: Path


def plan_runs(out_dir: Path, losses: list[str], seeds: list[int]) -> list[Run]:
    """Every (loss, seed) run, seed-major (a comparison stopped early has every loss at the first seeds), each in
    OUT/<loss>/seed_<s>."""
    return [Run(loss, seed, out_dir / run_dir_name(loss) / f"seed_{seed}") for seed in seeds for loss in losses]


def run_overrides(run: Run, overrides: list[str]) -> list[str]:
    """The overrides of one run's `kd train` (the user's come last; `check_overrides` keeps them off ours)."""
    return [f"run.output_dir={run.dir}", f"loss.name={run.loss}", f"train.seed={run.seed}", "resume=auto", *overrides]


def train_command(recipe: str, run: Run, overrides: list[str], nproc: Optional[int]) -> list[str]:
    """The `kd train` command of one run."""
    cmd = [sys.executable, "-m", "kd.cli", "train", recipe, *run_overrides(run, overrides)]
    return cmd + (["--nproc", str(nproc)] if nproc else [])


def check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in SET_BY_TOOL:
            flag = {"run.output_dir": "--out", "loss.name": "--losses", "train.seed": "--seeds"}.get(key)
            raise UserError(f"{key} is set per run by compare_losses" + (f"; use {flag}" if flag else "")
                            + f" (got override {item!r})")


@dataclass
class RunState:
    """What a run directory holds: `status` is missing | unfinished | finished | past_end (logged steps after the
    final one) | unknown (train.epochs: no known final step); `step` the last logged step; `final` the eval record counted in the table (None if none)."""
    status: str
    step: int = 0
    final: Optional[dict] = None
    start: Optional[dict] = None  # the step-0 eval record


def run_state(run_dir: Path, final_step: Optional[int]) -> RunState:
    """Finished = an eval record at `final_step` in metrics.jsonl (the trainer always evaluates its last step and
    writes the eval into that step's record). A cut last line (a killed run) is ignored by read_metrics."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return RunState("missing")
    if not path.read_text(encoding="utf-8").strip():
        return RunState("unfinished")  # killed before its first record
    records = read_metrics(run_dir, warn=lambda message: None)
    evals = {step: {"step": step, **r} for step, r in records.items() if r.get(EVAL_KEY) is not None}
    last = max(records)
    start = evals.get(0)
    if final_step is None:
        return RunState("unknown", last, evals[max(evals)] if evals else None, start)
    if last > final_step:  # trained further under another train.max_steps: its step-`final_step` eval had another lr
        return RunState("past_end", last, None, start)
    if final_step in evals:
        return RunState("finished", last, evals[final_step], start)
    return RunState("unfinished", last, None, start)


def requested_recipe(recipe: str, run: Run, overrides: list[str]) -> dict[str, Any]:
    """The resolved recipe `kd train` will run for `run` (validated; raises UserError like kd does)."""
    import yaml

    return yaml.safe_load(dump_recipe(load_recipe(recipe, run_overrides(run, overrides))))


def final_step_of(resolved: dict[str, Any]) -> Optional[int]:
    train = resolved["train"]
    return train["max_steps"] if train.get("epochs") is None else None


def checked_states(runs: list, resolved: dict, identity: Callable[[Any, dict[str, Any]], None]
                   ) -> tuple[dict, dict]:
    """Each run's final step and state (anything with a `.dir`: a loss run here, an arm in compare_instruct), after
    `identity` has checked every finished run against its resolved recipe; a run logged past its final step is
    refused (its table row would not be the requested step)."""
    finals = {run: final_step_of(resolved[run]) for run in runs}
    states = {run: run_state(run.dir, finals[run]) for run in runs}
    for run in runs:
        if states[run].status == "finished":
            identity(run, resolved[run])
        if states[run].status == "past_end":
            raise UserError(f"{run.dir} has trained to step {states[run].step}, past the requested final step "
                            f"{finals[run]} (train.max_steps); use another --out for a shorter comparison")
    return finals, states


def check_identity(run: Run, resolved: dict[str, Any]) -> None:
    """A finished run must be the run this command asks for: same models, data, loss and seed (kd's resume keys)."""
    saved_path = run.dir / "recipe.yaml"
    if not saved_path.is_file():
        return
    import yaml

    from kd.resume import recipe_differences  # imports torch: only when there is a finished run to check

    diffs = recipe_differences(yaml.safe_load(saved_path.read_text()), resolved)
    if diffs:
        raise UserError(f"{run.dir} is a finished run of a different recipe ({'; '.join(diffs[:3])}); use another "
                        "--out, or delete that run to train it again")


def summary(values: list[float]) -> dict[str, Any]:
    """Mean, min, max and sample std (None with one value) over seeds."""
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}


def _aggregate(label: str, records: list[dict], seeds: list[int]) -> dict[str, Any]:
    row: dict[str, Any] = {"loss": label, "steps": sorted({int(r["step"]) for r in records}), "seeds": seeds}
    for key, _, _ in COLUMNS:
        values = [float(r[key]) for r in records if r.get(key) is not None]
        row[key] = summary(values) if values else None
    return row


def table_rows(runs: list[Run], states: dict[Run, RunState]) -> list[dict[str, Any]]:
    """One row per loss over its runs with a final eval, preceded by the step-0 row: per seed, the step-0 eval of
    the first run that has one (the student before training does not depend on the loss)."""
    rows, start_by_seed = [], {}
    for loss in dict.fromkeys(r.loss for r in runs):
        counted = [r for r in runs if r.loss == loss and states[r].final is not None]
        rows.append(_aggregate(loss, [states[r].final for r in counted], [r.seed for r in counted]))
        for r in runs:
            if r.loss == loss and states[r].start is not None:
                start_by_seed.setdefault(r.seed, states[r].start)
    if start_by_seed:
        seeds = sorted(start_by_seed)
        rows.insert(0, _aggregate("(student before training)", [start_by_seed[s] for s in seeds], seeds))
    return rows


def cell(stats: Optional[dict], fmt: str) -> str:
    """'mean' with one seed, 'mean (min–max)' with several, 'n/a' without a value."""
    if stats is None or math.isnan(stats["mean"]):
        return "n/a"
    if len(stats["values"]) == 1:
        return fmt.format(stats["mean"])
    return f"{fmt.format(stats['mean'])} ({fmt.format(stats['min'])}–{fmt.format(stats['max'])})"


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (paste-ready for the README)."""
    header = ["loss", "steps", "seeds", *[title for _, title, _ in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * len(COLUMNS)) + "|"]
    for row in rows:
        steps = "/".join(map(str, row["steps"])) or "-"
        seeds = " ".join(map(str, row["seeds"])) or "none finished"
        lines.append("| " + " | ".join([row["loss"], steps, seeds, *[cell(row[k], fmt) for k, _, fmt in COLUMNS]])
                     + " |")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _progress(message: str) -> None:
    print(f"compare_losses: {message}", file=sys.stderr, flush=True)


def call_run(cmd: list[str]) -> int:
    """Run one `kd train` to its end. Ctrl-C reaches kd too (same process group), which saves and exits: wait for
    that instead of killing it mid-save (what subprocess.call would do), then report the interrupt. kd's output goes
    to stderr, so stdout holds only the table (or the JSON)."""
    try:
        to_stderr = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        to_stderr = None
    proc = subprocess.Popen(cmd, stdout=to_stderr)
    interrupted = False
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            interrupted = True
            _progress("interrupted: waiting for the run to save its checkpoint and stop")
    return 130 if interrupted and code == 0 else code


def train_runs(args, runs: list[Run], states: dict[Run, RunState], finals: dict[Run, Optional[int]]) -> int:
    """Train every run that is not finished, one after the other, with a progress line each; 0 or the exit code of
    the first run that failed."""
    started, steps_done = time.monotonic(), 0
    for index, run in enumerate(runs, start=1):
        name, state, final = f"[{index}/{len(runs)}] {run.loss} seed {run.seed}", states[run], finals[run]
        if state.status == "finished":
            _progress(f"{name}: finished (eval at step {final}), skipped")
            continue
        todo = "" if final is None else f" -> {final}"
        verb = "starting" if state.status == "missing" else f"continuing (last logged step {state.step})"
        _progress(f"{name}: {verb}, steps {state.step}{todo}: {shlex.join(['kd', *train_command(args.recipe, run, args.overrides, args.nproc)[3:]])}")
        t0 = time.monotonic()
        code = call_run(train_command(args.recipe, run, args.overrides, args.nproc))
        if code != 0:
            _progress(f"{name}: the run failed (exit {code}); run the same command again to continue")
            return code
        states[run] = after = run_state(run.dir, final)
        if final is not None and after.status != "finished":
            raise UserError(f"{run.dir}: the run ended without an eval at step {final} (last logged step "
                            f"{after.step}); does the recipe have a held-out split (data.eval_fraction)?")
        steps_done += max(0, after.step - state.step)
        kl = after.final.get(EVAL_KEY) if after.final else None
        left = [r for r in runs[index:] if states[r].status != "finished"]
        eta = ""
        if left and steps_done and all(finals[r] is not None for r in left):
            per_step = (time.monotonic() - started) / steps_done
            eta = f"; about {_duration(per_step * sum(finals[r] - states[r].step for r in left))} left for " \
                  f"{len(left)} run(s)"
        _progress(f"{name}: done in {_duration(time.monotonic() - t0)}"
                  + (f", KL {kl:.4f}" if kl is not None else "") + eta)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value, applied to every run (e.g. train.max_steps=40)")
    parser.add_argument("--losses", nargs="+", default=["ce", "forward_kl", "taid"], help="loss.name of each run")
    parser.add_argument("--seeds", nargs="+", type=int, default=None,
                        help="train.seed of each run of every loss (default: the recipe's train.seed)")
    parser.add_argument("--out", default="runs/compare_losses", help="parent directory of the runs (DIR/<loss>/seed_<s>)")
    parser.add_argument("--nproc", type=int, default=None, help="processes per run (default: the recipe's run.nproc)")
    parser.add_argument("--no-train", action="store_true", help="only print the table from existing runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--plot", type=Path, default=None, help="also draw the held-out curves of every loss (PNG)")
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    # overrides may come after the --flags too (after --losses, which would take them: no loss name has a '=')
    args.overrides = [*args.overrides, *extra, *(a for a in args.losses if "=" in a)]
    args.losses = [a for a in args.losses if "=" not in a]
    out_dir = Path(args.out)
    try:
        if not Path(args.recipe).is_file():
            raise UserError(f"recipe {args.recipe} not found")
        check_overrides(args.overrides)
        if len(set(map(run_dir_name, args.losses))) != len(args.losses):
            raise UserError(f"--losses names the same run twice: {' '.join(args.losses)}")
        if args.seeds is None:
            args.seeds = [load_recipe(args.recipe, args.overrides).train.seed]
        if len(set(args.seeds)) != len(args.seeds):
            raise UserError(f"--seeds names the same seed twice: {' '.join(map(str, args.seeds))}")
        runs = plan_runs(out_dir, args.losses, args.seeds)
        resolved = {run: requested_recipe(args.recipe, run, args.overrides) for run in runs}  # every recipe error now
        finals, states = checked_states(runs, resolved, check_identity)
        if not args.no_train:
            code = train_runs(args, runs, states, finals)
            if code != 0:
                return code
        rows = table_rows(runs, states)
        if all(not row["seeds"] for row in rows):
            raise UserError(f"no finished run with an eval record ({EVAL_KEY}) under {out_dir}; train first (leave "
                            "out --no-train)")
        for run in runs:
            if states[run].status in ("unfinished", "missing"):
                where = "not trained" if states[run].status == "missing" else \
                    f"at step {states[run].step} of {finals[run]}"
                _progress(f"{run.loss} seed {run.seed}: {where}, not in the table")
        if args.plot is not None:
            plot_curves(runs, states, args.plot)
    except UserError as err:
        print(f"compare_losses: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        again = shlex.join(["python", "tools/compare_losses.py", args.recipe, *args.overrides, "--losses",
                            *args.losses, "--seeds", *map(str, args.seeds), "--out", str(out_dir)]
                           + (["--nproc", str(args.nproc)] if args.nproc else []))
        print(f"Held-out metrics after training; mean (min–max) over seeds (reproduce: `{again}`):\n")
        print(markdown(rows))
    return 0


def plot_curves(runs: list[Run], states: dict[Run, RunState], out: Path) -> None:
    """The held-out curves of every loss on one figure: runs counted in the table, via tools/plot_run.py."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import plot_run

    groups: dict[str, list[Path]] = {}
    for run in runs:
        if states[run].final is not None:
            groups.setdefault(run.loss, []).append(run.dir)
    plot_run.plot_compare({label: [plot_run.read_series(d) for d in dirs] for label, dirs in groups.items()}, out,
                          title=f"held-out metrics of {runs[0].dir.parent.parent}")
    _progress(f"figure: {out}")


if __name__ == "__main__":
    sys.exit(main())
