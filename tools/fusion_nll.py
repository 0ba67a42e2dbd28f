"""Held-out NLL per token of every model of a fusion recipe and of the fusions made from them, on one data set:
the large base alone, the small base, each expert alone, proxy-tuning (static a = 1 per expert, Liu et al. 2024) and
the recipe's dynamic fusion (its mode and grid), all from the same forwards of the same batches.

    python tools/fusion_nll.py recipes/fusion/quickstart_fusion.yaml [data.train.path=asset:jane-austen ...]
        [--max-batches 8] [--json OUT]

The data are the recipe's held-out split (data.eval, else the data.eval_fraction of data.train: override
data.train.path for each domain). NLL counts the label tokens (next-token targets) of the batches, summed over all of
them and divided once by their count. One process, every model a replica (kd.fusion.generate.load_fusion). Prints a
table and, last, one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def token_nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(label) over the shifted, unmasked positions of [B, L, V] logits, and their count."""
    from kd.labels import IGNORE_INDEX

    target = labels[:, 1:].reshape(-1)
    keep = target != IGNORE_INDEX
    pred = logits[:, :-1].reshape(-1, logits.shape[-1])[keep].float()
    return float(torch.nn.functional.cross_entropy(pred, target[keep], reduction="sum")), int(keep.sum())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--max-batches", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from kd.assets import resolve
    from kd.data import build_datasets, collate, eval_batches
    from kd.fusion.generate import load_fusion
    from kd.fusion.solver import fuse_logits
    from kd.preflight import check_recipe, load_recipe_tokenizer, prepare_assets

    recipe = check_recipe(args.recipe, args.overrides)
    if recipe.teacher.fusion is None:
        sys.exit(f"{args.recipe}: no teacher.fusion section")
    prepare_assets(recipe)
    tokenizer = load_recipe_tokenizer(recipe)
    _, eval_ds = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, resolve_path=resolve)
    fusion = load_fusion(recipe, tokenizer, torch.device("cpu"))
    names = ["large base", "small base"] + [f"expert {t}" for t in range(len(fusion.experts))]
    names += ["proxy-tuning (a = 1)", f"dynamic fusion ({recipe.teacher.fusion.mode})"]
    sums = dict.fromkeys(names, 0.0)
    count = 0
    weight_sums = torch.zeros(len(fusion.experts), dtype=torch.float64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        for samples in eval_batches(eval_ds, rank=0, world_size=1, micro_batch_size=recipe.train.micro_batch_size,
                                    max_batches=args.max_batches):
            batch = collate(samples, pad)
            shape = (*batch["input_ids"].shape, fusion.vocab_size)
            flat = [m(batch).logits[..., :fusion.vocab_size].reshape(-1, fusion.vocab_size)
                    for m in (fusion.large, fusion.small, *fusion.experts)]
            static = fuse_logits(flat[0], flat[1], flat[2:], mode="static", chunk_rows=recipe.teacher.fusion.chunk_rows)
            dynamic = fusion.solve(flat[0], flat[1], flat[2:])
            for name, logits in zip(names, [*flat, static.logits, dynamic.logits]):
                total, n = token_nll_sum(logits.view(shape), batch["labels"])
                sums[name] += total
            count += n
            keep = batch["attention_mask"].reshape(-1).bool()
            weight_sums += dynamic.weights[keep].double().sum(0)
            positions = int(keep.sum())
            print(f"batch: {n} tokens, {positions} positions", file=sys.stderr, flush=True)
    nll = {name: s / max(count, 1) for name, s in sums.items()}
    data = recipe.data.eval.path if recipe.data.eval else recipe.data.train.path
    print(f"held-out NLL per token on {data} ({count} tokens):")
    for name, value in nll.items():
        print(f"  {name:28s} {value:.4f}")
    summary = {"data": data, "tokens": count, "nll": nll, "recipe": args.recipe, "overrides": args.overrides}
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
