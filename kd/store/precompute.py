"""`kd precompute RECIPE [--k K] [--out DIR]`: run the recipe's teacher once and store its top-k signal.

The kd process checks the flags and the recipe, tokenizes the data once (the datasets cache), and starts N ranks on
the deepspeed launcher, each running `main` here. The teacher is built exactly as for training (any source: one
model, ZeRO-3 sharded or a replica, or a fusion), so a store of a teacher that needs all ranks' memory is written by
all ranks together.

Work is cut into shards of consecutive samples per split; the shards that are not done yet are dealt to the ranks
round-robin. A ZeRO-3 forward is a collective, so every rank runs the same number of forwards: a rank out of work
runs a filler batch and drops its output. Each shard is written whole and then recorded (kd.store.format), so a
killed precompute run again with the same command redoes only the shards that have no record. The manifest is
written last, by rank 0, when every shard of both splits is in place.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Optional

import torch

from kd.errors import EXIT_USER_ERROR, UserError
from kd.labels import IGNORE_INDEX
from kd.store.format import (FORMAT_VERSION, FORMATS, SETTINGS, ShardTokens, finished_shard, write_manifest,
                             write_shard)

DEFAULT_K = 64
ROW_BLOCK = 256  # rows of [*, V] fp32 log-probs alive at once while taking the top k


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--k", type=int, default=DEFAULT_K, help=f"tokens kept per position (default {DEFAULT_K})")
    p.add_argument("--out", default=None, help="store directory (default: the recipe's teacher.store)")
    p.add_argument("--format", choices=FORMATS, default="plain", help="plain: exact; compact: ~4x smaller, 8-bit "
                   "log-probs (error measured by tools/bench_store.py)")
    p.add_argument("--shard-samples", type=int, default=256, help="samples per shard (the unit of resumption)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per teacher forward (default: "
                   "train.micro_batch_size)")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: run.nproc)")


# ------------------------------------------------------------------ the signal
def topk_signal(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int, k: int, temperature: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ids and log-probs, log tail mass and the label's log-prob of ``logits`` [N, V'] (cut to ``vocab_size``)
    at ``temperature``; rows in blocks so only ROW_BLOCK x V fp32 values exist at once. The tail is the logsumexp of
    the log-probs outside the top k (exact, and -inf when k = V), not log(1 - sum), which cancels catastrophically."""
    ids, top, tail, label = [], [], [], []
    for lo in range(0, logits.shape[0], ROW_BLOCK):
        lp = torch.log_softmax(logits[lo:lo + ROW_BLOCK, :vocab_size].float() / temperature, dim=-1)
        values, index = lp.topk(k, dim=-1)
        label.append(lp.gather(-1, labels[lo:lo + ROW_BLOCK, None].clamp_min(0)).squeeze(-1))
        tail.append(torch.logsumexp(lp.scatter(-1, index, float("-inf")), dim=-1))
        ids.append(index)
        top.append(values)
    if not ids:
        empty = logits.new_zeros((0, k))
        return empty.long(), empty.float(), logits.new_zeros(0).float(), logits.new_zeros(0).float()
    return torch.cat(ids), torch.cat(top), torch.cat(tail), torch.cat(label)


def batch_tokens(logits: torch.Tensor, labels: torch.Tensor, *, vocab_size: int, k: int, temperature: float
                 ) -> ShardTokens:
    """The stored form of one batch: the loss tokens (shifted labels != IGNORE_INDEX) of each sample, in order."""
    shifted, next_labels = logits[:, :-1], labels[:, 1:]
    mask = next_labels != IGNORE_INDEX
    ids, lp, tail, label = topk_signal(shifted[mask], next_labels[mask], vocab_size=vocab_size, k=k,
                                       temperature=temperature)
    counts = mask.sum(dim=1).cpu()
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    return ShardTokens(offsets, ids.cpu(), lp.cpu(), tail.cpu(), label.cpu())


def concat(parts: list[ShardTokens]) -> ShardTokens:
    offsets = [torch.zeros(1, dtype=torch.long)]
    base = 0
    for part in parts:
        offsets.append(part.offsets[1:] + base)
        base += int(part.offsets[-1])
    return ShardTokens(torch.cat(offsets), torch.cat([p.ids for p in parts]), torch.cat([p.logprobs for p in parts]),
                       torch.cat([p.tail for p in parts]), torch.cat([p.label for p in parts]))


# ------------------------------------------------------------------ the plan
def shard_plan(num_samples: dict[str, int], shard_samples: int) -> list[tuple[str, int, int, int]]:
    """(split, shard index, first sample, count) of every shard of both splits."""
    plan = []
    for split, n in num_samples.items():
        for index, first in enumerate(range(0, n, shard_samples)):
            plan.append((split, index, first, min(shard_samples, n - first)))
    return plan


def settings_of(args: argparse.Namespace, identity: dict[str, Any]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "format": args.format, "k": args.k, "shard_samples": args.shard_samples,
            **identity}


def check_settings(store_dir: str, settings: dict[str, Any]) -> None:
    """A store directory holds one store: a precompute resumed into it must be the same precompute."""
    from kd.store.identity import differences

    path = os.path.join(store_dir, SETTINGS)
    if not os.path.isfile(path):
        return
    with open(path) as f:
        existing = json.load(f)
    diff = differences(existing, settings)
    if diff:
        raise UserError(f"{store_dir} already holds (part of) another store; it differs in: " + "; ".join(diff) +
                        ". Pick another --out, or delete the directory to start over", key="--out")


# ------------------------------------------------------------------ per rank
def precompute(args: argparse.Namespace, recipe: Any, store_dir: str, log=print) -> dict[str, Any]:
    """The rank's share of the store; rank 0 writes the manifest. Returns the manifest (on every rank)."""
    from kd.data.collate import collate, take
    from kd.engine import dist
    from kd.preflight import load_recipe_tokenizer
    from kd.data import build_datasets
    from kd.assets import resolve
    from kd.files import atomic_write
    from kd.store.identity import expected_identity
    from kd.teachers import build_teacher_source

    device = dist.device()
    tokenizer = load_recipe_tokenizer(recipe)
    with dist.main_process_first():
        train_ds, eval_ds = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, resolve_path=resolve)
    splits = {"train": train_ds, **({"eval": eval_ds} if eval_ds is not None and len(eval_ds) else {})}
    vocab = len(tokenizer)
    if not 1 <= args.k <= vocab:
        raise UserError(f"--k must be in [1, {vocab}] (the vocabulary), got {args.k}", key="--k")
    identity = expected_identity(recipe, tokenizer, vocab, train_ds, eval_ds)
    settings = settings_of(args, identity)

    def start() -> None:
        os.makedirs(store_dir, exist_ok=True)
        check_settings(store_dir, settings)
        atomic_write(os.path.join(store_dir, SETTINGS), json.dumps(settings, indent=1, sort_keys=True) + "\n")

    dist.run_on_main(start)
    plan = shard_plan({s: len(ds) for s, ds in splits.items()}, args.shard_samples)
    # which shards are done is decided once, on rank 0, so every rank deals the same list
    todo = dist.run_on_main(lambda: [i for i, (split, index, _, _) in enumerate(plan)
                                     if finished_shard(store_dir, split, index) is None], share_result=True)
    mine = todo[dist.rank()::dist.world_size()]
    batch_size = args.batch_size or recipe.train.micro_batch_size
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    forwards = sum(-(-plan[i][3] // batch_size) for i in mine)
    total_forwards = int(dist.all_reduce_max(torch.tensor([forwards])).item())
    teacher = build_teacher_source(recipe, device=device, resolve_path=resolve)
    filler = {k: v.to(device) for k, v in collate(take(train_ds, [0]), pad_id).items()}
    if dist.is_main():
        done = len(plan) - len(todo)
        log(f"kd precompute: {len(plan)} shards ({done} already done), k = {args.k}, {args.format} format, "
            f"{dist.world_size()} rank(s), into {store_dir}")
    started, tokens_done, forward_count = time.time(), 0, 0
    for i in mine:
        split, index, first, count = plan[i]
        parts = []
        for lo in range(first, first + count, batch_size):
            rows = list(range(lo, min(lo + batch_size, first + count)))
            batch = {k: v.to(device) for k, v in collate(take(splits[split], rows), pad_id).items()}
            logits = teacher(batch).logits
            parts.append(batch_tokens(logits, batch["labels"], vocab_size=vocab, k=args.k,
                                      temperature=recipe.loss.temperature))
            forward_count += 1
        tokens = concat(parts)
        write_shard(store_dir, split, index, tokens, fmt=args.format, vocab_size=vocab, first=first)
        tokens_done += int(tokens.ids.shape[0])
        if dist.is_main():
            rate = tokens_done / max(time.time() - started, 1e-9)
            log(f"kd precompute: rank 0 wrote {split} shard {index} ({count} samples, {tokens.ids.shape[0]} tokens; "
                f"{rate:.0f} tokens/s on this rank)")
    while forward_count < total_forwards:  # the other ranks still run collective forwards
        teacher(filler)
        forward_count += 1
    rate = dist.sum_values([float(tokens_done)])[0] / max(time.time() - started, 1e-9)

    def finish() -> dict[str, Any]:
        records = {}
        for split, index, _, _ in plan:
            record = finished_shard(store_dir, split, index)
            if record is None:
                raise UserError(f"shard {split} {index} is missing after the precompute; run the same command again")
            records.setdefault(split, []).append(record)
        manifest = {**settings, "shards": records, "teacher_config": teacher.info.config.to_dict()
                    if teacher.info.config is not None else None, "created_unix": time.time()}
        write_manifest(store_dir, manifest)
        return manifest

    manifest = dist.run_on_main(finish, share_result=True)
    if dist.is_main():
        total = sum(r["tokens"] for rs in manifest["shards"].values() for r in rs)
        size = sum(r["bytes"] for rs in manifest["shards"].values() for r in rs)
        log(f"kd precompute: store complete: {total} tokens, {size / max(total, 1):.0f} bytes/token, "
            f"{rate:.0f} tokens/s (all ranks) -> {store_dir}")
    return manifest


# ------------------------------------------------------------------ the kd process and the rank entry
def _store_dir(args: argparse.Namespace, recipe: Any) -> str:
    out = args.out or recipe.teacher.store
    if not out:
        raise UserError("where should the store go? pass --out DIR (or set teacher.store in the recipe)", key="--out")
    return os.path.abspath(out)


def _check_flags(args: argparse.Namespace) -> None:
    for flag, value in (("--k", args.k), ("--shard-samples", args.shard_samples), ("--batch-size", args.batch_size),
                        ("--nproc", args.nproc)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}", key=flag)


def _recipe_for_precompute(args: argparse.Namespace):
    from kd.preflight import check_recipe

    recipe = check_recipe(args.recipe, args.overrides)
    if recipe.teacher.store is not None:
        # the teacher section describes the model that writes the store; the store itself is not read here
        recipe = recipe.model_copy(update={"teacher": recipe.teacher.model_copy(update={"store": None})})
    return recipe


def run(args: argparse.Namespace) -> int:
    """`kd precompute` in the kd process: everything checkable is checked before a rank starts."""
    from kd.cli import launch_ranks
    from kd.preflight import check_models, prepare_assets, prepare_data

    _check_flags(args)
    recipe = _recipe_for_precompute(args)
    store_dir = _store_dir(args, recipe)
    prepare_assets(recipe)
    tokenizer = check_models(recipe)
    if args.k > len(tokenizer):
        raise UserError(f"--k must be at most the vocabulary ({len(tokenizer)}), got {args.k}", key="--k")
    prepare_data(recipe, tokenizer)
    nproc = args.nproc or recipe.run.nproc
    argv = ["--k", str(args.k), "--out", store_dir, "--format", args.format, "--shard-samples",
            str(args.shard_samples), *(["--batch-size", str(args.batch_size)] if args.batch_size else []),
            "--nproc", str(nproc), args.recipe, *args.overrides]
    return launch_ranks(nproc, argv, module="kd.store.precompute")  # the per-rank entry is main() below


def main(argv: Optional[list[str]] = None) -> int:
    """Per-rank entry (`python -m deepspeed.launcher.launch ... --module kd.store.precompute ARGS`)."""
    parser = argparse.ArgumentParser(prog="kd precompute (rank)")
    add_arguments(parser)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    from kd.engine import dist

    code = 0
    try:
        recipe = _recipe_for_precompute(args)
        dist.init()
        precompute(args, recipe, _store_dir(args, recipe), log=lambda m: print(m, file=sys.stderr, flush=True))
    except UserError as e:
        if os.environ.get("RANK", "0") == "0":
            print(e.report(), file=sys.stderr, flush=True)
        code = EXIT_USER_ERROR
    except dist.RemoteError as e:
        if os.environ.get("RANK", "0") == "0":
            print(f"kd: error: {e}", file=sys.stderr, flush=True)
        code = 1
    dist.shutdown()
    return code


if __name__ == "__main__":
    from kd.engine.dist import exit_process

    exit_process(main())  # a rank's process ends without the interpreter's teardown (see exit_process)
