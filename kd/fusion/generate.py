"""`kd fuse-generate RECIPE --prompts FILE --out FILE.jsonl`: completions of the fused model (the recipe's
``teacher`` steered by ``teacher.fusion``'s experts, a* solved at every decoding step), the paper's weak-to-strong use.

The same prompts file, checks, batching and output as `kd generate` (kd.generation.cli: ``prompt`` or ``messages``
lines, one output line per prompt in file order written atomically at the end, finish reasons, batches dealt to
ranks with a seed stream per batch so the completions do not depend on --nproc). Each output line also holds
``fusion_weight_mean`` (mean a* per expert over the completion's tokens) and, in single mode,
``fusion_selected_fraction`` (the fraction of its tokens at which each expert was the one selected).

With --nproc 1 every model is a replica in this process; with --nproc N > 1 each model has the engine its recipe
section asks for (``zero_stage: 3`` shards it across the ranks, as in training).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from kd.errors import UserError
from kd.generation import cli as gen_cli

PROG = "kd fuse-generate"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe with a teacher.fusion section")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--prompts", required=True, help="JSON lines with a 'prompt' or 'messages' field")
    p.add_argument("--out", required=True, help="output JSON lines file")
    gen_cli.add_rollout_arguments(p, gather_help="ZeRO-3 models: gather parameters once per rollout, or layer by layer")


def prepare(args: argparse.Namespace):
    """Every check before a weight is loaded: flags, prompts, recipe (with a fusion section), assets, tokenizer,
    the fusion's models (configs and tokenizers). Returns the recipe, tokenizer, prompt rows and token ids."""
    from kd.assets import resolve
    from kd.preflight import check_recipe, load_recipe_tokenizer, prepare_assets
    from kd.teachers.fusion import check_fusion_models

    gen_cli.check_flags(args)
    rows = gen_cli.read_prompts(args.prompts)
    recipe = check_recipe(args.recipe, args.overrides)
    if recipe.teacher.fusion is None:
        raise UserError("fuse-generate decodes with a fusion of models, but this recipe has none: add a "
                        "teacher.fusion section (small_base, experts; README \"Dynamic logit fusion\"), or use "
                        "`kd generate --model teacher` for the teacher alone", key="teacher.fusion",
                        file=args.recipe)
    prepare_assets(recipe)
    tokenizer = load_recipe_tokenizer(recipe)
    gen_cli.check_tokenizer(tokenizer, args.recipe)
    check_fusion_models(recipe, tokenizer, resolve_path=resolve)
    return recipe, tokenizer, rows, gen_cli.encode(tokenizer, rows, args.prompts)


def load_fusion(recipe: Any, tokenizer: Any, device) -> Any:
    """The recipe's `FusionTeacher`: replicas in one process; with several ranks, each model on the engine its
    section asks for (collective: every rank loads the models in the same order)."""
    from kd.assets import resolve
    from kd.engine import dist
    from kd.teachers.fusion import build_fusion_teacher

    if dist.world_size() > 1:
        return build_fusion_teacher(recipe, device=device, resolve_path=resolve, tokenizer=tokenizer)
    # one process: a ZeRO-3 engine over one rank would only add a process group; every model is a replica
    replicas = recipe.model_copy(deep=True)
    for section in (replicas.teacher, replicas.teacher.fusion.small_base, *replicas.teacher.fusion.experts):
        section.offload_params = False  # first: the section's check refuses offload without ZeRO-3
        section.zero_stage = 0
    return build_fusion_teacher(replicas, device=device, resolve_path=resolve, tokenizer=tokenizer)


def generate_all(args: argparse.Namespace, recipe: Any, tokenizer: Any, rows: list[dict], prompt_ids: list[list[int]]
                 ) -> list[dict[str, Any]]:
    """This rank's share of the rollouts; every prompt's output row on every rank (in file order)."""
    import torch
    from tqdm import tqdm

    from kd.engine import dist
    from kd.fusion.decode import fused_generate
    from kd.generation import SamplingConfig, left_pad, make_sampler

    device, world, rank = dist.device(), dist.world_size(), dist.rank()
    fusion = load_fusion(recipe, tokenizer, device)
    config = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    eos = {tokenizer.eos_token_id}
    generation_eos = getattr(getattr(fusion.large.module, "generation_config", None), "eos_token_id", None)
    eos |= set(generation_eos if isinstance(generation_eos, list)
               else [generation_eos] if generation_eos is not None else [])
    single = recipe.teacher.fusion.mode == "single"
    batches = [list(range(i, min(i + args.batch_size, len(rows)))) for i in range(0, len(rows), args.batch_size)]
    rounds = -(-len(batches) // world)
    mine = []
    for r in tqdm(range(rounds), desc=PROG, unit="round", file=sys.stderr,
                  disable=not (dist.is_main() and recipe.run.progress_bar)):
        b = r * world + rank
        rows_b = batches[b] if b < len(batches) else []
        # a rank without a batch this round still runs the rollout (a ZeRO-3 forward is a collective)
        ids, mask = left_pad([prompt_ids[i] for i in rows_b] or [[tokenizer.pad_token_id]], tokenizer.pad_token_id,
                             device)
        out = fused_generate(fusion, ids, mask, sampler=make_sampler(config, seed=args.seed, stream=b, device=device),
                             eos_ids=sorted(eos), pad_id=tokenizer.pad_token_id, gather=args.gather,
                             active=torch.tensor([True] * len(rows_b) or [False]))
        done = out.completions
        for j, i in enumerate(rows_b):
            tokens = done.completion(j)
            row = {"index": i, **{k: rows[i][k] for k in ("prompt", "messages") if k in rows[i]},
                   "completion": tokenizer.decode(tokens, skip_special_tokens=True), "tokens": len(tokens),
                   "finish_reason": done.finish_reasons[j], "fusion_weight_mean": out.weight_means(j)}
            if single:
                row["fusion_selected_fraction"] = out.selected_fractions(j)
            mine.append(row)
    everyone = dist.all_gather_object(mine)
    return sorted((row for part in everyone for row in part), key=lambda row: row["index"])


def rank_argv(args: argparse.Namespace) -> list[str]:
    """The flags a rank's `main` parses back into the same options."""
    flags = ["--prompts", args.prompts, "--out", args.out, "--max-new-tokens", str(args.max_new_tokens),
             "--temperature", repr(args.temperature), "--top-p", repr(args.top_p), "--top-k", str(args.top_k),
             "--seed", str(args.seed), "--batch-size", str(args.batch_size), "--gather", args.gather,
             "--nproc", str(args.nproc)]
    return [*flags, args.recipe, *args.overrides]


def _done(args: argparse.Namespace, count: int) -> None:
    print(f"{PROG}: wrote {count} completions to {args.out}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """In the kd process: check everything, then decode here (--nproc 1) or launch N ranks running `main`."""
    recipe, tokenizer, rows, prompt_ids = prepare(args)
    if args.nproc == 1:
        gen_cli.write_output(args.out, generate_all(args, recipe, tokenizer, rows, prompt_ids))
        _done(args, len(rows))
        return 0
    from kd.cli import launch_ranks

    return launch_ranks(args.nproc, rank_argv(args), module="kd.fusion.generate")  # the per-rank entry is main()


def main(argv: list[str] | None = None) -> int:
    """Per-rank entry (`python -m deepspeed.launcher.launch ... --module kd.fusion.generate ARGS`)."""
    parser = argparse.ArgumentParser(prog=f"{PROG} (rank)")
    add_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    return gen_cli.rank_body(args, prepare, generate_all, lambda n: _done(args, n))


if __name__ == "__main__":
    from kd.engine.dist import exit_process

    exit_process(main())  # a rank's process ends without the interpreter's teardown (see exit_process)
