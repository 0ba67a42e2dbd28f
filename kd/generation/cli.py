"""`kd generate RECIPE --prompts FILE --out FILE.jsonl`: completions for a file of prompts, batched over ranks.

The prompts file is JSON lines, each with a ``prompt`` string (tokenized as is) or a ``messages`` list (the
tokenizer's chat template, with the generation prompt). Everything the user can get wrong (the file, a line, a flag,
a tokenizer without EOS or pad) is checked in the `kd` process before a model is loaded or a rank started, and
nothing is written then. The output has one line per prompt, in the prompts' order, written atomically at the end.

Batches are cut in file order and dealt to ranks round-robin; batch b samples from its own stream of the seed
(`stream_seed(seed, b)`), so the completions do not depend on --nproc. Ranks run the same number of rollouts (a rank
without a batch in the last round decodes an inactive filler row), as ZeRO-3 requires. With --nproc N > 1 each rank
holds a replica of the model, except `--model teacher` with `teacher.zero_stage: 3`, which is sharded as in training
and generates with its parameters gathered once per rollout (--gather).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kd.errors import EXIT_USER_ERROR, UserError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' or 'messages' field")
    p.add_argument("--out", required=True, help="output JSON lines file")
    p.add_argument("--model", default="student", help="student (newest checkpoint of run.output_dir), teacher, or "
                   "a checkpoint / exported model directory")
    add_rollout_arguments(p, gather_help="ZeRO-3 teacher: gather parameters once per rollout, or layer by layer")


def add_rollout_arguments(p: argparse.ArgumentParser, *, gather_help: str) -> None:
    """Sampling, batching and launch flags, the same for `kd generate` and `kd fuse-generate`."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per rollout on each rank")
    p.add_argument("--gather", choices=["auto", "always", "never"], default="auto", help=gather_help)
    p.add_argument("--nproc", type=int, default=1, help="processes on this machine")


# ------------------------------------------------------------------ checks (the kd process, before anything loads)
def read_prompts(path: str) -> list[dict[str, Any]]:
    if not os.path.isfile(path):
        raise UserError("no such file", file=path)
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"not valid JSON: {e.msg}", key=f"line {number}", file=path) from None
            has_prompt = isinstance(row, dict) and isinstance(row.get("prompt"), str)
            has_messages = isinstance(row, dict) and isinstance(row.get("messages"), list) and row["messages"]
            if not (has_prompt or has_messages):
                raise UserError("needs a 'prompt' string or a non-empty 'messages' list", key=f"line {number}",
                                file=path)
            rows.append(row)
    if not rows:
        raise UserError("holds no prompts", file=path)
    return rows


def check_flags(args: argparse.Namespace) -> None:
    from kd.generation.sampling import SamplingConfig

    for flag, value, ok, need in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens >= 1, "at least 1"),
                                  ("--batch-size", args.batch_size, args.batch_size >= 1, "at least 1"),
                                  ("--nproc", args.nproc, args.nproc >= 1, "at least 1"),
                                  ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                                  ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]"),
                                  ("--top-k", args.top_k, args.top_k >= 0, ">= 0")):
        if not ok:
            raise UserError(f"{flag} must be {need}, got {value}")
    SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if os.path.isdir(args.out) or args.out.endswith(os.sep):
        raise UserError(f"--out {args.out} is a directory; give a file name")


def check_tokenizer(tokenizer: Any, recipe_path: str) -> None:
    for what, value in (("EOS", tokenizer.eos_token_id), ("pad", tokenizer.pad_token_id)):
        if value is None:
            raise UserError(f"the tokenizer has no {what} token id; generation needs one (set the tokenizer's "
                            f"{what.lower()}_token)", key="tokenizer", file=recipe_path)


def encode(tokenizer: Any, rows: list[dict[str, Any]], prompts_path: str) -> list[list[int]]:
    out = []
    for number, row in enumerate(rows, 1):
        if isinstance(row.get("prompt"), str):
            ids = tokenizer(row["prompt"])["input_ids"]
        else:
            try:
                text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
            except Exception as e:  # no template, or the template's own raise_exception(...)
                raise UserError(f"the chat template rejected the messages: {e}", key=f"line {number}",
                                file=prompts_path) from None
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise UserError("the prompt has no tokens", key=f"line {number}", file=prompts_path)
        out.append(ids)
    return out


def prepare(args: argparse.Namespace):
    """Every check, in the order a user fixes things; returns the recipe, tokenizer, prompt rows and token ids."""
    from kd.preflight import check_recipe, load_recipe_tokenizer, prepare_assets

    check_flags(args)
    rows = read_prompts(args.prompts)
    recipe = check_recipe(args.recipe, args.overrides)
    prepare_assets(recipe)
    tokenizer = load_recipe_tokenizer(recipe)
    check_tokenizer(tokenizer, args.recipe)
    return recipe, tokenizer, rows, encode(tokenizer, rows, args.prompts)


# ------------------------------------------------------------------ the work (every rank)
def _load_model(args: argparse.Namespace, recipe: Any, tokenizer: Any, device):
    """A `kd.generation.Target`: a sharded teacher engine (several ranks, teacher.zero_stage 3) or a replica."""
    from kd.assets import resolve
    from kd.engine import dist
    from kd.generation import Target, teacher_target

    if args.model == "teacher":
        if dist.world_size() > 1 and recipe.teacher.zero_stage == 3:
            from kd.teachers.factory import build_teacher_source

            return teacher_target(build_teacher_source(recipe, device=device, resolve_path=resolve))
        from kd.models import load_teacher

        return Target(load_teacher(recipe.teacher, zero3_config=None, resolve_path=resolve).to(device))
    from kd.eval_cli import _load_student, find_student

    source = find_student(None if args.model == "student" else args.model, recipe.run.output_dir)
    return Target(_load_student(source, recipe, tokenizer).to(device))


def generate_all(args: argparse.Namespace, recipe: Any, tokenizer: Any, rows: list[dict], prompt_ids: list[list[int]]
                 ) -> list[dict[str, Any]]:
    """This rank's share of the rollouts; returns every prompt's output row on rank 0 (in file order)."""
    import torch
    from tqdm import tqdm

    from kd.engine import dist
    from kd.generation import SamplingConfig, generate, left_pad, make_sampler

    device, world, rank = dist.device(), dist.world_size(), dist.rank()
    target = _load_model(args, recipe, tokenizer, device)
    config = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    eos = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(target.model, "generation_config", None), "eos_token_id", None)
    if generation_eos is not None:
        eos |= set(generation_eos if isinstance(generation_eos, list) else [generation_eos])
    vocab = min(len(tokenizer), int(target.model.config.vocab_size))
    batches = [list(range(i, min(i + args.batch_size, len(rows)))) for i in range(0, len(rows), args.batch_size)]
    rounds = -(-len(batches) // world)
    mine = []
    for r in tqdm(range(rounds), desc="kd generate", unit="round", file=sys.stderr,
                  disable=not (dist.is_main() and recipe.run.progress_bar)):
        b = r * world + rank
        rows_b = batches[b] if b < len(batches) else []
        # a rank without a batch this round still runs the rollout (a ZeRO-3 forward is a collective)
        ids, mask = left_pad([prompt_ids[i] for i in rows_b] or [[tokenizer.pad_token_id]], tokenizer.pad_token_id,
                             device)
        out = generate(target, ids, mask, sampler=make_sampler(config, seed=args.seed, stream=b, device=device),
                       eos_ids=sorted(eos), pad_id=tokenizer.pad_token_id, gather=args.gather, vocab_size=vocab,
                       active=torch.tensor([True] * len(rows_b) or [False]))
        for j, i in enumerate(rows_b):
            tokens = out.completion(j)
            mine.append({"index": i, **{k: rows[i][k] for k in ("prompt", "messages") if k in rows[i]},
                         "completion": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
                         "finish_reason": out.finish_reasons[j]})
    everyone = dist.all_gather_object(mine)
    return sorted((row for part in everyone for row in part), key=lambda row: row["index"])


def write_output(path: str, results: list[dict[str, Any]]) -> None:
    from kd.files import atomic_write

    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write(os.path.abspath(path), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in results))
    except OSError as e:  # a full disk or a read-only directory: one line, and nothing half-written (atomic)
        raise UserError(f"cannot write the completions: {e.strerror or e}", file=path) from None


def rank_body(args: argparse.Namespace, prepare, generate_all, finished) -> int:
    """What every rank of a generating command runs (kd generate, kd fuse-generate): prepare, generate in lockstep,
    rank 0 writes ``args.out`` and calls ``finished(n_rows)``. A failure on rank 0's write reaches every rank (no
    rank is left in a barrier), and all leave the process group together (a rank tearing gloo down while a peer still
    receives aborts the process)."""
    from kd.engine import dist

    try:
        recipe, tokenizer, rows, prompt_ids = prepare(args)  # already checked by the kd process: cannot fail here
        dist.init()
        results = generate_all(args, recipe, tokenizer, rows, prompt_ids)

        def write() -> None:
            write_output(args.out, results)
            finished(len(rows))

        dist.run_on_main(write)
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(e.report(), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    dist.shutdown()
    return 0


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The flags a rank's `main` parses back into the same options."""
    flags = ["--prompts", args.prompts, "--out", args.out, "--model", args.model, "--max-new-tokens",
             str(args.max_new_tokens), "--temperature", repr(args.temperature), "--top-p", repr(args.top_p),
             "--top-k", str(args.top_k), "--seed", str(args.seed), "--batch-size", str(args.batch_size),
             "--gather", args.gather, "--nproc", str(args.nproc)]
    return [*flags, args.recipe, *args.overrides]


def run(args: argparse.Namespace) -> int:
    """`kd generate` in the kd process: check everything, then generate here (--nproc 1) or launch N ranks."""
    recipe, tokenizer, rows, prompt_ids = prepare(args)
    if args.nproc == 1:
        write_output(args.out, generate_all(args, recipe, tokenizer, rows, prompt_ids))
        _wrote(args, len(rows))
        return 0
    from kd.cli import launch_ranks

    return launch_ranks(args.nproc, rank_argv(args), module="kd.generation.cli")  # the per-rank entry is main()


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry (`python -m deepspeed.launcher.launch ... --module kd.generation.cli ARGS`)."""
    parser = argparse.ArgumentParser(prog="kd generate (rank)")
    add_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    return rank_body(args, prepare, generate_all, lambda n: _wrote(args, n))


def _wrote(args: argparse.Namespace, n: int) -> None:
    print(f"kd generate: wrote {n} completions to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    from kd.engine.dist import exit_process

    exit_process(main())  # a rank's process ends without the interpreter's teardown (see exit_process)
