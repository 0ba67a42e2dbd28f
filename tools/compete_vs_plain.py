"""Competitive distillation against plain distillation at equal optimizer steps (issue 14's evidence).

    python tools/compete_vs_plain.py recipes/compete_quickstart.yaml --out runs/compete_evidence [--nproc 2]

Steps, each skipped when its result is already on disk (so a re-run continues where the last one stopped):

1. the compete run itself (`kd compete RECIPE run.output_dir=OUT/compete`; resumes with resume: auto), keeping every
   student checkpoint so the student of every round can be evaluated afterwards;
2. plain distillation: `kd train` of the same student, teacher, loss and optimizer on the round-0 pool (the teacher's
   answers to the seed instructions, which compete writes as round_01/train.jsonl for its first imitation) for
   rounds x imitation_steps steps, checkpointed after every imitation_steps steps (OUT/plain);
3. per round r (step s = r x imitation_steps), for the compete student and the plain student at step s:
   `kd eval` (held-out NLL, KL, top-1 agreement on data.eval) and `python -m kd.compete.evaluate` against round r's
   scores.jsonl (the instructions and teacher answers the compete student was judged on in round r).

The compete student's numbers are the run's own (rounds.jsonl: its win rate judged in the discrimination phase, its
held-out eval/* logged by its trainer after the round's imitation on the same data.eval); with --recheck-compete its
checkpoints also go through `kd eval` and kd.compete.evaluate, exactly as the plain student's (a second win-rate
column). The plain run logs the same in-training eval every imitation_steps steps (metrics.jsonl), kept in
results.json as a cross-check of `kd eval`.

Prints a markdown table and writes OUT/results.json. --parts runs only some steps (e.g. the plain run while the
compete run is still going in another process); every step still skips what is already on disk.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = "step_{:08d}"


# ---------------------------------------------------------------------------------------------------- pure pieces
def compete_finished(state_path: str) -> bool:
    """Whether a compete run's state.json says every round is done."""
    if not os.path.isfile(state_path):
        return False
    with open(state_path) as f:
        return json.load(f).get("phase") == "done"


def read_rounds(path: str) -> dict[int, dict[str, Any]]:
    """round -> its record from a compete run's rounds.jsonl."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {int(row["round"]): row for row in rows}


def eval_metrics(path: str) -> dict[str, float]:
    """The metrics of a `kd eval --json` file, without the eval/ prefix."""
    with open(path) as f:
        payload = json.load(f)
    return {k.split("/", 1)[1]: v for k, v in payload["metrics"].items()}


def head_to_head(path: str) -> dict[str, Any]:
    """The one record `python -m kd.compete.evaluate --json` writes."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) != 1:
        raise ValueError(f"{path}: expected one record, found {len(rows)}")
    return rows[0]


def run_evals(rounds: dict[int, dict[str, Any]], steps_per_round: int) -> dict[int, dict[str, float]]:
    """step -> the held-out metrics a compete run's round records hold (eval/* after each round's imitation), without
    the eval/ prefix."""
    return {r * steps_per_round: {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval/")}
            for r, row in rounds.items()}


def metrics_evals(path: str) -> dict[int, dict[str, float]]:
    """step -> the eval/* scalars of a kd training run's metrics.jsonl, without the prefix."""
    out: dict[int, dict[str, float]] = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line) if line.strip() else {}
            found = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith("eval/")}
            if found:
                out.setdefault(int(row["step"]), {}).update(found)
    return out


def table_rows(rounds: dict[int, dict[str, Any]], steps_per_round: int,
               evals: dict[tuple[str, int], dict[str, float]],
               duels: dict[tuple[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round: its step count, both students' win rates and held-out metrics. ``evals`` and ``duels`` are
    keyed by (side, step), side "compete" or "plain"; a missing measurement is None."""
    out = []
    for r in sorted(rounds):
        step = r * steps_per_round
        row: dict[str, Any] = {"round": r, "step": step, "pool_size": rounds[r].get("pool_size"),
                               "judged": rounds[r].get("judged"), "win_rate/compete_in_run": rounds[r].get("win_rate")}
        for side in ("compete", "plain"):
            duel, metrics = duels.get((side, step)), evals.get((side, step), {})
            row[f"win_rate/{side}"] = duel["win_rate"] if duel else None
            for key in ("student_nll", "kl", "top1_agreement"):
                row[f"{key}/{side}"] = metrics.get(key)
        out.append(row)
    return out


def _fmt(value: Optional[float], digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table; the rechecked compete win rate only when some row has one."""
    columns = [("round", "round", str), ("steps", "step", str), ("pool", "pool_size", str),
               ("win rate: compete (in run)", "win_rate/compete_in_run", _fmt),
               ("win rate: compete (rechecked)", "win_rate/compete", _fmt), ("win rate: plain", "win_rate/plain", _fmt),
               ("NLL: compete", "student_nll/compete", _fmt), ("NLL: plain", "student_nll/plain", _fmt),
               ("KL: compete", "kl/compete", _fmt), ("KL: plain", "kl/plain", _fmt),
               ("top-1: compete", "top1_agreement/compete", _fmt), ("top-1: plain", "top1_agreement/plain", _fmt)]
    if all(row["win_rate/compete"] is None for row in rows):
        columns = [c for c in columns if c[1] != "win_rate/compete"]
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(row[key]) for _, key, show in columns) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- the runs
class Evidence:
    def __init__(self, recipe_path: str, out: str, nproc: Optional[int], overrides: list[str], *,
                 recheck_compete: bool = False, parts: tuple[str, ...] = ("compete", "plain", "evals")):
        from kd.config import load_recipe

        self.recipe_path, self.out, self.nproc, self.overrides = recipe_path, os.path.abspath(out), nproc, overrides
        self.recheck_compete, self.parts = recheck_compete, parts
        recipe = load_recipe(recipe_path, overrides)
        if recipe.compete is None:
            raise SystemExit(f"{recipe_path}: no compete section")
        self.rounds, self.steps = recipe.compete.rounds, recipe.compete.imitation_steps
        self.compete_dir = os.path.join(self.out, "compete")
        self.plain_dir = os.path.join(self.out, "plain")
        self.eval_dir = os.path.join(self.out, "evals")
        self.log_dir = os.path.join(self.out, "logs")
        os.makedirs(self.eval_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)

    # paths ------------------------------------------------------------------------------------------------------
    def round_file(self, r: int, name: str) -> str:
        return os.path.join(self.compete_dir, "compete", f"round_{r:02d}", name)

    def checkpoint(self, side: str, step: int) -> str:
        # compete's student is a kd training run inside the compete run directory
        run = os.path.join(self.compete_dir, "student") if side == "compete" else self.plain_dir
        return os.path.join(run, "checkpoints", TAG.format(step))

    def _nproc(self) -> list[str]:
        return ["--nproc", str(self.nproc)] if self.nproc else []

    def _run(self, name: str, cmd: list[str]) -> None:
        log = os.path.join(self.log_dir, f"{name}.log")
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        started = time.time()
        print(f"compete_vs_plain: {name}: {' '.join(cmd)} (log {log})", flush=True)
        with open(log, "a") as f:
            code = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        self.timings[name] = self.timings.get(name, 0.0) + time.time() - started
        if code != 0:
            raise SystemExit(f"compete_vs_plain: {name} failed (exit {code}); see {log}; run again to continue")

    # steps ------------------------------------------------------------------------------------------------------
    def compete(self) -> None:
        if compete_finished(os.path.join(self.compete_dir, "compete", "state.json")):
            return
        # every student checkpoint is kept (the recipe keeps the newest only): each round's student is evaluated
        keep = self.rounds * self.steps
        self._run("compete", [sys.executable, "-m", "kd.cli", "compete", self.recipe_path, *self.overrides,
                              f"run.output_dir={self.compete_dir}", f"checkpoint.keep_last={keep}", *self._nproc()])

    def plain_overrides(self) -> list[str]:
        # the round-0 pool as compete's first imitation reads it; also the train set kd eval tokenizes (eval is
        # data.eval either way)
        return [*self.overrides, f"data.train.path={self.round_file(1, 'train.jsonl')}"]

    def plain(self) -> None:
        total = self.rounds * self.steps
        if all(os.path.isdir(self.checkpoint("plain", r * self.steps)) for r in range(1, self.rounds + 1)):
            return
        self._run("plain", [sys.executable, "-m", "kd.cli", "train", self.recipe_path, *self.plain_overrides(),
                            f"run.output_dir={self.plain_dir}", f"train.max_steps={total}", "train.epochs=null",
                            f"checkpoint.interval={self.steps}", f"checkpoint.keep_last={self.rounds}",
                            f"eval.interval={self.steps}", *self._nproc()])

    def evaluations(self, rounds: dict[int, dict[str, Any]]) -> tuple[dict, dict]:
        evals, duels = {}, {}
        for step, metrics in run_evals(rounds, self.steps).items():
            evals[("compete", step)] = metrics
        for r in sorted(rounds):  # the rounds the compete run has finished (all of them once it is done)
            step = r * self.steps
            for side in ("compete", "plain") if self.recheck_compete else ("plain",):
                ckpt = self.checkpoint(side, step)
                out = os.path.join(self.eval_dir, f"{side}_{TAG.format(step)}.eval.json")
                if not os.path.isfile(out):
                    self._run(f"eval_{side}_{step}", [sys.executable, "-m", "kd.cli", "eval", self.recipe_path,
                                                      *self.plain_overrides(), "--student", ckpt, "--json", out])
                evals[(side, step)] = eval_metrics(out)
                out = os.path.join(self.eval_dir, f"{side}_{TAG.format(step)}.duel.jsonl")
                if not os.path.isfile(out):
                    self._run(f"duel_{side}_{step}", [sys.executable, "-m", "kd.compete.evaluate", self.recipe_path,
                                                      *self.plain_overrides(), "--student", ckpt,
                                                      "--scores", self.round_file(r, "scores.jsonl"), "--json", out])
                duels[(side, step)] = head_to_head(out)
        return evals, duels

    def run(self) -> dict[str, Any]:
        self.timings: dict[str, float] = {}
        started = time.time()
        if "compete" in self.parts:
            self.compete()
        if "plain" in self.parts:
            self.plain()
        if "evals" not in self.parts:
            return {}
        rounds = read_rounds(os.path.join(self.compete_dir, "compete", "rounds.jsonl"))
        evals, duels = self.evaluations(rounds)
        rows = table_rows(rounds, self.steps, evals, duels)
        plain_metrics = os.path.join(self.plain_dir, "metrics.jsonl")
        result = {"recipe": self.recipe_path, "overrides": self.overrides, "rounds": self.rounds,
                  "imitation_steps": self.steps, "recheck_compete": self.recheck_compete, "rows": rows,
                  "compete_rounds": rounds,
                  "plain_in_training_evals": metrics_evals(plain_metrics) if os.path.isfile(plain_metrics) else {},
                  "duels": {f"{side}_{step}": d for (side, step), d in duels.items()},
                  "seconds_this_invocation": {**self.timings, "total": time.time() - started}}
        from kd.files import atomic_write

        atomic_write(os.path.join(self.out, "results.json"), json.dumps(result, indent=1) + "\n")
        return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value, applied to every run")
    parser.add_argument("--out", required=True, help="compete/, plain/, evals/, logs/ and results.json go here")
    parser.add_argument("--nproc", type=int, default=None, help="ranks of the two training runs (default run.nproc)")
    parser.add_argument("--recheck-compete", action="store_true",
                        help="also run kd eval and kd.compete.evaluate on the compete student's checkpoints")
    parser.add_argument("--parts", nargs="+", choices=["compete", "plain", "evals"],
                        default=["compete", "plain", "evals"], help="steps to do (default: all)")
    args = parser.parse_args(argv)
    sys.path.insert(0, REPO)
    result = Evidence(args.recipe, args.out, args.nproc, args.overrides, recheck_compete=args.recheck_compete,
                      parts=tuple(args.parts)).run()
    if not result:
        return 0
    print(markdown_table(result["rows"]))
    print(f"compete_vs_plain: wrote {os.path.join(os.path.abspath(args.out), 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
