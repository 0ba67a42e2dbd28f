"""Tokens/s of kd's generation: ZeRO-3 parameters gathered once per rollout vs layer by layer (2 ranks), against
Hugging Face `generate` on an unsharded replica in one process (and kd's loop on the same replica), on the same
prompts and lengths (every row decodes exactly --new-tokens tokens: EOS can not end a row early).

    python tools/bench_generate.py [--model HF_DIR] [--batch 8 --prompt-len 64 --new-tokens 64 --nproc 2]

Without --model a random Llama of --layers/--hidden is built from a config. The 2-rank part runs this script under
torch.distributed.run (`--worker`); rank 0 prints one JSON line, which the parent reads. The last line printed is
a JSON summary with the ratios.

Two replica baselines: `hf_replica` is HF `generate` alone in one process, the issue's baseline. `hf_replica_per_rank`
is HF `generate` on a whole replica in every rank of the 2-rank part at the same moment (each rank timed on its own,
the mean reported, each rank's weights a private copy): the ranks then share the machine exactly as the ZeRO-3 ranks
do, so `gathered_once_vs_hf_per_rank` separates what sharing the machine costs from what kd's loop and the gather
cost.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
NO_EOS = [-1]  # an id no token has: rows run to --new-tokens, the same work for every engine


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 32),
                         num_key_value_heads=max(1, args.hidden // 64), max_position_embeddings=4096,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(config).eval()


def prompts(args, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """--batch prompts of uneven lengths (the longest --prompt-len), left-padded; the same on every run."""
    from kd.generation import left_pad

    g = torch.Generator().manual_seed(1)
    lengths = [max(1, args.prompt_len - (i * args.prompt_len) // (2 * args.batch)) for i in range(args.batch)]
    return left_pad([torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths], 0, device)


def time_kd(model, ids, mask, args, **kw) -> float:
    from kd.engine import dist
    from kd.generation import SamplingConfig, Sampler, generate

    sampler = Sampler(SamplingConfig(args.new_tokens, temperature=0.0))
    generate(kw.get("target", model), ids[:, -2:], mask[:, -2:], sampler=Sampler(SamplingConfig(2, temperature=0.0)),
             eos_ids=NO_EOS, pad_id=0, gather=kw.get("gather", "auto"))  # warm-up
    dist.synchronize()
    t0 = time.perf_counter()
    out = generate(kw.get("target", model), ids, mask, sampler=sampler, eos_ids=NO_EOS, pad_id=0,
                   gather=kw.get("gather", "auto"))
    dist.synchronize()
    assert sum(out.num_tokens) == args.batch * args.new_tokens
    return sum(out.num_tokens) / (time.perf_counter() - t0)


@torch.no_grad()
def time_hf(model, ids, mask, args) -> float:
    from kd.engine import dist

    kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, pad_token_id=0)
    model.generate(input_ids=ids[:, -2:], attention_mask=mask[:, -2:], **{**kw, "max_new_tokens": 2,
                                                                          "min_new_tokens": 2})
    dist.synchronize()
    dist.barrier()  # in the 2-rank part: every rank's replica starts decoding at the same moment (no-op alone)
    t0 = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    dist.synchronize()
    assert out.shape[1] - ids.shape[1] == args.new_tokens
    return args.batch * args.new_tokens / (time.perf_counter() - t0)


def worker(args) -> None:
    """One rank of the ZeRO-3 part: the model as an inference-only ZeRO-3 engine (kd's teacher engine)."""
    import deepspeed

    from kd.engine import dist
    from kd.generation import Target

    dist.init()
    model = build_model(args)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=ds)
    ids, mask = prompts(args, model.config.vocab_size, dist.device())
    target = Target(engine.module, engine)
    result = {f"zero3_{g}": time_kd(None, ids, mask, args, target=target, gather=g) for g in ("always", "never")}
    del engine, target, model
    # every rank times HF generate on its own whole replica at the same moment: the per-rank baseline under the
    # same sharing of the machine as the ZeRO-3 ranks above
    replica = build_model(args).to(dist.device())
    # a private copy: from_pretrained maps the safetensors file, so on a CPU machine the ranks' replicas would read
    # the same physical pages (half the memory traffic of two real replicas; measured 16% faster per rank than any
    # copy of their own), and a GPU rank's weights are its own anyway
    for param in replica.parameters():
        param.data = param.data.clone()
    rates = dist.all_gather_object(time_hf(replica, ids, mask, args))
    result["hf_replica_per_rank"] = sum(rates) / len(rates)
    if dist.is_main():
        print("RESULT " + json.dumps(result), flush=True)


def summarize(rates: dict[str, float]) -> dict[str, float]:
    out = dict(rates)
    if "zero3_always" in rates and "zero3_never" in rates:
        out["gathered_once_vs_layers"] = rates["zero3_always"] / rates["zero3_never"]
    if "zero3_always" in rates and "hf_replica" in rates:
        out["gathered_once_vs_hf"] = rates["zero3_always"] / rates["hf_replica"]
    if "zero3_always" in rates and "hf_replica_per_rank" in rates:
        out["gathered_once_vs_hf_per_rank"] = rates["zero3_always"] / rates["hf_replica_per_rank"]
    if "kd_replica" in rates and "hf_replica" in rates:
        out["kd_replica_vs_hf"] = rates["kd_replica"] / rates["hf_replica"]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a Hugging Face model directory (default: a random Llama)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--nproc", type=int, default=2, help="ranks of the ZeRO-3 part (0: skip it)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> dict[str, float]:
    args = parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
    if args.worker:
        from kd.engine import dist

        worker(args)
        dist.shutdown()
        dist.exit_process(0)  # not the interpreter's teardown, where a gloo thread can abort the rank (kd.engine.dist)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    model = build_model(args).to(device)
    ids, mask = prompts(args, model.config.vocab_size, device)
    rates = {"hf_replica": time_hf(model, ids, mask, args), "kd_replica": time_kd(model, ids, mask, args)}
    if args.nproc > 0:
        flags = worker_flags(args)
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--master_port",
               str(_free_port()), os.path.abspath(__file__), *flags, "--worker"]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
        if run.returncode != 0 or not lines:
            sys.exit(f"bench_generate: the ZeRO-3 ranks failed:\n{run.stderr[-3000:]}")
        rates.update(json.loads(lines[-1][len("RESULT "):]))
    summary = summarize(rates)
    print(f"generation, batch {args.batch}, prompts up to {args.prompt_len}, {args.new_tokens} new tokens, {device}:")
    for name, value in summary.items():
        print(f"  {name:<26} {value:10.2f}{' tok/s' if not name.count('_vs_') else ' x'}")
    print(json.dumps(summary))
    return summary


def worker_flags(args) -> list[str]:
    """The flags a ZeRO-3 rank gets: the model and the sizes, rebuilt from the parsed arguments. Not the command
    line as typed: torch.distributed.run reads an option placed after the script when it is a prefix of its own
    (`--nproc` of `--nproc-per-node`), and the ranks need no --nproc."""
    flags = ["--model", args.model] if args.model else []
    for name in ("layers", "hidden", "vocab", "batch", "prompt_len", "new_tokens"):
        flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
