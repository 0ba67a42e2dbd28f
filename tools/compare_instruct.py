#!/usr/bin/env python
"""Train the instruction-distillation recipes (off-policy, on-policy, sequence-level KD) for the same steps and print
their final held-out metrics side by side.

    python tools/compare_instruct.py [RECIPE ...] [key=value ...] [--out DIR] [--nproc N] [--no-train] [--json]

RECIPE defaults to recipes/instruct_offpolicy.yaml, recipes/instruct_onpolicy.yaml and recipes/instruct_seqkd.yaml.
Each recipe is one run in ``DIR/<name>/`` (name = the file name without ``instruct_`` and ``.yaml``), trained one
after the other as ``kd train RECIPE run.output_dir=DIR/<name> resume=auto [key=value ...]``.

**A fair comparison or none.** The recipes must agree on everything that decides what is learned and measured except
where the answers come from: models, tokenizer, data (hence the held-out set), loss, seed, steps and batch shape
(kd.resume's identity keys plus train.*). Only `on_policy` (and run.*) may differ; anything else is an error naming
the key.

**Resumable** (tools/compare_losses.py's rules): a run whose metrics.jsonl holds the eval of its final step is
finished and skipped, after checking that its saved recipe.yaml is the one requested (everything but run.* and
resume); any other run goes to ``kd train ... resume=auto``, which continues it from its newest checkpoint.

The table (Markdown): per recipe, the fraction of its steps that trained on generated completions, and at the final
step on the held-out conversations' *reference* answers: KL(teacher || student) at T = 1, the student's NLL per
answer token, and top-1 agreement with the teacher; first the student before training (the step-0 eval). Bad input:
one line on stderr, exit code 2; a failing run stops the comparison with its exit code.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kd from a source checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # compare_losses, a sibling script

import compare_losses as cl  # noqa: E402

from kd.config.loader import dump_recipe, load_recipe  # noqa: E402
from kd.errors import EXIT_USER_ERROR, UserError  # noqa: E402
from kd.metrics import read_metrics  # noqa: E402

DEFAULT_RECIPES = ["recipes/instruct_offpolicy.yaml", "recipes/instruct_onpolicy.yaml", "recipes/instruct_seqkd.yaml"]
SET_BY_TOOL = ("run.output_dir", "resume")
MAY_DIFFER = ("run", "resume", "on_policy")  # top-level sections the arms may differ in
COLUMNS = [  # (metrics.jsonl key, header, format): what the issue asks for, in its order
    ("eval/kl", "held-out KL(teacher ‖ student)", "{:.4f}"),
    ("eval/student_nll", "student NLL on reference answers", "{:.4f}"),
    ("eval/top1_agreement", "top-1 agreement", "{:.3f}"),
]


@dataclass(frozen=True)
class Arm:
    name: str
    recipe: str
    dir: Path


def arm_name(recipe: str) -> str:
    return cl.run_dir_name(Path(recipe).stem.removeprefix("instruct_"))


def plan_arms(recipes: list[str], out_dir: Path) -> list[Arm]:
    arms = [Arm(arm_name(r), r, out_dir / arm_name(r)) for r in recipes]
    if len({a.name for a in arms}) != len(arms):
        raise UserError(f"two recipes map to the same run directory under {out_dir}: {' '.join(recipes)}")
    return arms


def arm_overrides(arm: Arm, overrides: list[str]) -> list[str]:
    return [f"run.output_dir={arm.dir}", "resume=auto", *overrides]


def train_command(arm: Arm, overrides: list[str], nproc: Optional[int]) -> list[str]:
    cmd = [sys.executable, "-m", "kd.cli", "train", arm.recipe, *arm_overrides(arm, overrides)]
    return cmd + (["--nproc", str(nproc)] if nproc else [])


def resolve(arm: Arm, overrides: list[str]) -> dict[str, Any]:
    """The resolved recipe `kd train` will run for `arm` (validated; raises UserError like kd does)."""
    import yaml

    return yaml.safe_load(dump_recipe(load_recipe(arm.recipe, arm_overrides(arm, overrides))))


def differences(a: Any, b: Any, key: str = "", skip: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes, leaving out the top-level sections `skip`."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if not key and k in skip:
                continue
            out += differences(a.get(k), b.get(k), f"{key}.{k}" if key else k)
        return out
    return [] if a == b else [f"{key}: {a!r} vs {b!r}"]


def check_fair(arms: list[Arm], resolved: dict[Arm, dict], nproc: Optional[int]) -> None:
    first = arms[0]
    for arm in arms[1:]:
        diffs = differences(resolved[first], resolved[arm], skip=MAY_DIFFER)
        if nproc is None and resolved[first]["run"]["nproc"] != resolved[arm]["run"]["nproc"]:
            diffs.append(f"run.nproc: {resolved[first]['run']['nproc']} vs {resolved[arm]['run']['nproc']} "
                         "(another global batch)")
        if diffs:
            raise UserError(f"{arm.recipe} differs from {first.recipe} in {'; '.join(diffs[:4])}: the comparison "
                            "needs the same models, data, loss, steps and batch (only on_policy may differ)")


def check_identity(arm: Arm, resolved: dict[str, Any]) -> None:
    """A finished run must be the run asked for (its saved recipe.yaml, everything but run.* and resume)."""
    saved = arm.dir / "recipe.yaml"
    if not saved.is_file():
        return
    import yaml

    diffs = differences(yaml.safe_load(saved.read_text()), resolved, skip=("run", "resume"))
    if diffs:
        raise UserError(f"{arm.dir} is a finished run of another recipe ({'; '.join(diffs[:3])}); use another "
                        "--out, or delete that run to train it again")


def generated_fraction(run_dir: Path) -> Optional[float]:
    """Fraction of the logged steps whose batches were generated (onpolicy/on), 0 for a run without on_policy."""
    records = [r for step, r in read_metrics(run_dir, warn=lambda m: None).items() if step > 0 and "loss" in r]
    if not records:
        return None
    return sum(float(r.get("onpolicy/on") or 0.0) for r in records) / len(records)


def table_rows(arms: list[Arm], states: dict[Arm, cl.RunState]) -> list[dict[str, Any]]:
    rows = []
    start = next((states[a].start for a in arms if states[a].start is not None), None)
    if start is not None:
        rows.append({"recipe": "(student before training)", "step": 0, "generated": None,
                     **{k: start.get(k) for k, _, _ in COLUMNS}})
    for arm in arms:
        final = states[arm].final
        rows.append({"recipe": arm.name, "step": final["step"] if final else None,
                     "generated": generated_fraction(arm.dir) if final else None,
                     **{k: (final.get(k) if final else None) for k, _, _ in COLUMNS}})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    header = ["recipe", "steps", "generated steps", *[title for _, title, _ in COLUMNS]]
    lines = ["| " + " | ".join(header) + " |", "|---|---:|---:|" + "|".join(["---:"] * len(COLUMNS)) + "|"]
    for row in rows:
        cells = [row["recipe"], "-" if row["step"] is None else str(row["step"]),
                 "-" if row["generated"] is None else f"{row['generated']:.0%}"]
        cells += ["not finished" if row["step"] is None else ("n/a" if row[k] is None else fmt.format(row[k]))
                  for k, _, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _progress(message: str) -> None:
    print(f"compare_instruct: {message}", file=sys.stderr, flush=True)


def train_arms(args, arms: list[Arm], states: dict[Arm, cl.RunState], finals: dict[Arm, Optional[int]]) -> int:
    for index, arm in enumerate(arms, start=1):
        name, state, final = f"[{index}/{len(arms)}] {arm.name}", states[arm], finals[arm]
        if state.status == "finished":
            _progress(f"{name}: finished (eval at step {final}), skipped")
            continue
        cmd = train_command(arm, args.overrides, args.nproc)
        verb = "starting" if state.status == "missing" else f"continuing (last logged step {state.step})"
        _progress(f"{name}: {verb}: {shlex.join(['kd', *cmd[3:]])}")
        t0 = time.monotonic()
        code = cl.call_run(cmd)
        if code != 0:
            _progress(f"{name}: the run failed (exit {code}); run the same command again to continue")
            return code
        states[arm] = after = cl.run_state(arm.dir, final)
        if final is not None and after.status != "finished":
            raise UserError(f"{arm.dir}: the run ended without an eval at step {final} (last logged step {after.step})")
        kl = after.final.get("eval/kl") if after.final else None
        _progress(f"{name}: done in {cl._duration(time.monotonic() - t0)}" + (f", KL {kl:.4f}" if kl is not None else ""))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("items", nargs="*", help="recipes (default: the three instruct_*.yaml) and key.path=value "
                                                 "overrides applied to every run")
    parser.add_argument("--out", default="runs/compare_instruct", help="parent directory of the runs (DIR/<name>)")
    parser.add_argument("--nproc", type=int, default=None, help="processes per run (default: the recipes' run.nproc)")
    parser.add_argument("--no-train", action="store_true", help="only print the table from existing runs")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_intermixed_args(argv)  # recipes and overrides may come before or after the flags
    args.overrides = [a for a in args.items if "=" in a]
    recipes = [a for a in args.items if "=" not in a] or DEFAULT_RECIPES
    out_dir = Path(args.out)
    try:
        for recipe in recipes:
            if not Path(recipe).is_file():
                raise UserError(f"recipe {recipe} not found")
        for item in args.overrides:
            if item.split("=", 1)[0].strip() in SET_BY_TOOL:
                raise UserError(f"{item.split('=', 1)[0].strip()} is set per run by compare_instruct (got {item!r}); "
                                "use --out for the run directories")
        arms = plan_arms(recipes, out_dir)
        resolved = {arm: resolve(arm, args.overrides) for arm in arms}  # every recipe error before any training
        check_fair(arms, resolved, args.nproc)
        finals, states = cl.checked_states(arms, resolved, check_identity)
        if not args.no_train:
            code = train_arms(args, arms, states, finals)
            if code != 0:
                return code
        rows = table_rows(arms, states)
        if all(row["step"] is None for row in rows if row["step"] != 0):
            raise UserError(f"no finished run under {out_dir}; train first (leave out --no-train)")
    except UserError as err:
        print(f"compare_instruct: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        again = shlex.join(["python", "tools/compare_instruct.py", *recipes, *args.overrides, "--out", str(out_dir)]
                           + (["--nproc", str(args.nproc)] if args.nproc else []))
        print(f"Held-out metrics at the final step, on the reference answers (reproduce: `{again}`):\n")
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
