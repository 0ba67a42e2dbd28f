"""Teacher store benchmark (issue 15): size and fidelity of the stored signal, precompute speed, and training from
the store against the online teacher.

    python tools/bench_store.py recipes/quickstart.yaml                      # sizes, fidelity, precompute speed
    python tools/bench_store.py recipes/quickstart.yaml --train 40 --out runs/bench_store   # + training, eval

Part 1, in this process, on the first --samples training samples of the recipe with its teacher:
- bytes per loss token of each format at each k (what `kd precompute` writes: tensors + safetensors header; the
  compact format zlib'd),
- `kl_topk`: KL(dense teacher || the store's distribution), the store completed to the whole vocabulary by spreading
  its tail mass evenly over the tokens outside the top k (what any top-k store loses, a property of k),
- `kl_format`: KL over the k + 1 buckets between the exact and the decoded buckets (what the format loses),
- the precompute's tokens/s next to the teacher forward alone (the top-k extraction's cost as a ratio).
Part 2 (--train N): `kd precompute --k K`, then `kd train` for N steps online and from the store (same recipe,
seed and steps), then `kd eval` of both students against the real teacher: steps/s (median perf/step_s of the
steps after the first) and held-out KL, student NLL and top-1 agreement side by side.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _batches(recipe, n_samples: int):
    from kd.assets import resolve
    from kd.data import build_datasets
    from kd.data.collate import collate, take
    from kd.preflight import load_recipe_tokenizer

    tokenizer = load_recipe_tokenizer(recipe)
    train, _ = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed, resolve_path=resolve)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = list(range(min(n_samples, len(train))))
    size = recipe.train.micro_batch_size
    return tokenizer, [collate(take(train, rows[i:i + size]), pad) for i in range(0, len(rows), size)]


def _kl_topk(logits: torch.Tensor, k: int) -> float:
    """Mean KL(p || p_store) with p_store = top-k of p, the tail mass spread evenly over the other V - k tokens."""
    lp = torch.log_softmax(logits.double(), -1)
    top, ids = lp.topk(k, -1)
    vocab = lp.shape[-1]
    rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
    stored = (rest - math.log(max(vocab - k, 1)))[:, None].expand_as(lp).clone()
    stored.scatter_(-1, ids, top)
    p = lp.exp()
    return float((p * torch.where(p > 0, lp - stored, torch.zeros_like(lp))).sum(-1).mean())


def _kl_buckets(exact, decoded) -> float:
    """Mean KL over the k + 1 buckets of `exact` vs `decoded` (ids matched by sorting)."""
    order = exact.ids.argsort(-1)
    lp = torch.cat([exact.logprobs.gather(-1, order), exact.tail[:, None]], -1).double()
    got = torch.cat([decoded.logprobs, decoded.tail[:, None]], -1).double()
    assert torch.equal(exact.ids.gather(-1, order), decoded.ids)
    p = lp.exp()
    return float((p * torch.where(p > 0, lp - got, torch.zeros_like(lp))).sum(-1).mean())


def measure_formats(recipe, *, n_samples: int, ks: list[int]) -> list[dict]:
    from kd.assets import resolve
    from kd.models import load_teacher
    from kd.store import format as fmt
    from kd.store.precompute import batch_tokens, concat

    tokenizer, batches = _batches(recipe, n_samples)
    vocab = len(tokenizer)
    teacher = load_teacher(recipe.teacher, zero3_config=None, resolve_path=resolve)
    with torch.no_grad():
        start = time.perf_counter()
        logits = [teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
        forward_s = time.perf_counter() - start
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    rows = []
    for k in ks:
        start = time.perf_counter()
        stored = concat([batch_tokens(lg, b["labels"], vocab_size=vocab, k=k, temperature=recipe.loss.temperature)
                         for lg, b in zip(logits, batches)])
        extract_s = time.perf_counter() - start
        flat = torch.cat([lg[:, :-1][b["labels"][:, 1:] != -100][:, :vocab] / recipe.loss.temperature
                          for lg, b in zip(logits, batches)])
        kl_topk = _kl_topk(flat, k)
        for name in fmt.FORMATS:
            data = fmt.encode(stored, name, vocab)
            decoded = fmt.decode(data, name)
            rows.append({"k": k, "format": name, "bytes_per_token": len(data) / tokens, "kl_topk": kl_topk,
                         "kl_format": _kl_buckets(stored, decoded) if name != "plain" else 0.0,
                         "precompute_tokens_per_s": tokens / (forward_s + extract_s),
                         "forward_only_tokens_per_s": tokens / forward_s})
    return rows


def _kd(*args: str) -> None:
    print("bench_store: kd " + " ".join(args), file=sys.stderr, flush=True)
    code = subprocess.call([sys.executable, "-m", "kd.cli", *args], cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if code != 0:
        raise SystemExit(f"bench_store: kd {args[0]} failed with exit code {code}")


def _step_s(run_dir: Path) -> float:
    with open(run_dir / "metrics.jsonl") as f:
        steps = [json.loads(line) for line in f if '"perf/step_s"' in line]
    return statistics.median(r["perf/step_s"] for r in steps[1:] or steps)


def train_both(recipe_path: str, overrides: list[str], *, steps: int, k: int, out: Path) -> list[dict]:
    store = out / f"store_k{k}"
    common = [f"train.max_steps={steps}", "resume=auto", "run.progress_bar=false", *overrides]
    if not (store / "manifest.json").exists():
        _kd("precompute", recipe_path, *overrides, "--k", str(k), "--out", str(store))
    rows = []
    # The run directories must not be the store's own (store_k64): a run writes recipe.yaml, checkpoints/ there.
    for name, run, extra in (("online", out / "online", []),
                             (f"store k={k}", out / f"from_store_k{k}", [f"teacher.store={store}"])):
        _kd("train", recipe_path, *common, f"run.output_dir={run}", *extra)
        result = out / f"{run.name}_eval.json"
        _kd("eval", recipe_path, *overrides, f"run.output_dir={run}", "--json", str(result))
        with open(result) as f:
            metrics = json.load(f)["metrics"]
        rows.append({"teacher": name, "steps": steps, "step_s": _step_s(run), **metrics})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--samples", type=int, default=32, help="training samples for the size/fidelity part")
    parser.add_argument("--ks", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--train", type=int, default=0, metavar="STEPS", help="also train online and from a store")
    parser.add_argument("--k", type=int, default=64, help="k of the store trained from")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_store"))
    args = parser.parse_args(argv)
    from kd.config.loader import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    rows = measure_formats(recipe, n_samples=args.samples, ks=args.ks)
    print("| k | format | bytes/token | KL(dense ‖ top-k store) | KL from the format | precompute tokens/s | "
          "teacher forward alone |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['format']} | {r['bytes_per_token']:.0f} | {r['kl_topk']:.5f} | {r['kl_format']:.6f} | "
              f"{r['precompute_tokens_per_s']:.0f} | {r['forward_only_tokens_per_s']:.0f} "
              f"({r['precompute_tokens_per_s'] / r['forward_only_tokens_per_s']:.2f}x) |")
    if args.train:
        args.out.mkdir(parents=True, exist_ok=True)
        trained = train_both(args.recipe, args.overrides, steps=args.train, k=args.k, out=args.out)
        base = trained[0]["step_s"]
        print("\n| teacher | steps | s/step | speed vs online | held-out KL | student NLL | top-1 agreement |")
        print("|---|---|---|---|---|---|---|")
        for r in trained:
            print(f"| {r['teacher']} | {r['steps']} | {r['step_s']:.2f} | {base / r['step_s']:.2f}x | "
                  f"{r['eval/kl']:.4f} | {r['eval/student_nll']:.4f} | {r['eval/top1_agreement']:.4f} |")
        json.dump({"formats": rows, "training": trained}, open(args.out / "bench_store.json", "w"), indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
