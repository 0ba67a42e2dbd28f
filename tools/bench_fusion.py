"""The cost of dynamic logit fusion as a teacher source: time per micro-batch of the fused teacher (every model's
forward + the a* solver) against the sum of its models' forwards alone, measured in the same run (interleaved
repeats, medians), and the solver's peak extra memory against the bound below.

    python tools/bench_fusion.py [--size tiny|quickstart] [--experts 2] [--mode single] [--batch 2 --seq 128]
                                 [--chunk-rows 256] [--repeats 5] [--device cpu|cuda] [--dtype fp32|bf16]

--size quickstart: models of the quickstart family's shapes (large = SmolLM2-135M's config, 30 layers, V = 49152;
small base and experts = its 6-layer version), random weights built from configs (the timing does not depend on the
weights, and nothing is downloaded). --size tiny: 2-4 layer Llamas with V = 4099. The last line printed is a JSON
summary.

Memory bound (the solver, kd.fusion.solver.fuse_logits, for N = B x L positions, T experts, vocabulary V, chunks of
n = min(chunk_rows, N) rows, compute in fp32 = 4 bytes, the models' logits in s bytes each; "1 block" = n V fp32):
  - kept for the whole call: the fused logits, N x V x s (the result), plus [N, T] / [N] stats (negligible);
  - kept per chunk: d_t = z_t - z_S for every expert (T blocks) and z_L in fp32 (c blocks: c = 0 for fp32 logits,
    whose slice is used as it is, c = 1 otherwise); per row only scalars (logsumexp z_L, E_P[d_t], the targets);
  - while the chunk is built (one expert at a time): z_S in fp32 (c), log Q and Q (2), the expert's copy that becomes
    its d_t, log Q_t (turned into log Q_t - log Q in place) and Q_t (2 beyond the d's): at most T + 2c + 4 blocks;
    P (1) is made only after z_S, log Q and Q are freed, so T + c + 1 then;
  - while one candidate is scored: f(a) (1), turned into exp(f - max f) in place, the row sums and products being
    reductions and batched matrix products (no block): T + c + 1; coordinate descent (joint, T > 2) also keeps the
    other experts' sum and, for a_t = 0, scores it through a copy (+2): T + c + 3; the final f(a*) is kept and
    scored through a copy: T + c + 2. The previous chunk is freed before the next is built.
  Peak extra <= N V s + (T + 2c + 4) n V 4 bytes + 8 (4 T + 16) N bytes for the per-row vectors (weights, J, KLs,
  targets, the best-so-far state). For fp32 logits: (T + 4) blocks beyond the result, the figure the recipe reference
  gives for chunk_rows.
On CUDA the peak is torch.cuda.max_memory_allocated over the solve; on CPU it is the running sum of the allocations
and frees that the PyTorch profiler records during the solve (profile_memory=True), which counts the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
               max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
TINY = dict(vocab_size=4099, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False)


def build_fusion(args, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd.config.schema import FusionConfig
    from kd.teachers.fusion import FusionTeacher
    from kd.teachers.model import ModelTeacher

    shape = SMOLLM2 if args.size == "quickstart" else TINY
    large_layers, small_layers = (30, 6) if args.size == "quickstart" else (4, 2)

    def model(seed, layers):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, bos_token_id=None, **shape)).to(dtype)
        return ModelTeacher(m, None, device)

    large, small = model(0, large_layers), model(1, small_layers)
    experts = [model(2 + t, small_layers) for t in range(args.experts)]
    cfg = FusionConfig(small_base={"path": "small"}, experts=[{"path": f"e{t}"} for t in range(args.experts)],
                       mode=args.mode, chunk_rows=args.chunk_rows)
    return FusionTeacher(large, small, experts, cfg, vocab_size=shape["vocab_size"])


def synced(device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def forwards_only(fusion, batch):
    """What the fused source does before solving (every model's forward, logits cut and flattened), without it."""
    from kd.teachers.base import TeacherRequest

    vocab = fusion.vocab_size
    return [m(batch, TeacherRequest()).logits[..., :vocab].reshape(-1, vocab)
            for m in (fusion.large, fusion.small, *fusion.experts)]


def peak_solver_bytes(fusion, flat, device) -> int:
    """Peak bytes allocated during one solve above what was allocated before it (its inputs)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fusion.solve(flat[0], flat[1], flat[2:])
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return peak
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fusion.solve(flat[0], flat[1], flat[2:])
    del result
    # every event's *self* bytes (allocated minus freed by the op itself, not its children; "[memory]" events are
    # frees and allocations outside any op) in the order they started: the live-bytes curve at op granularity
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["tiny", "quickstart"], default="tiny")
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--mode", choices=["single", "joint", "static"], default="single")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", default=None, help="also write the summary to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    fusion = build_fusion(args, device, dtype)
    vocab = fusion.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    fusion(batch)  # warm-up: first-call allocations and kernel selection are not what a training step pays
    t_models, t_fused, t_solve = [], [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits all three alike
        dt, flat = synced(device, lambda: forwards_only(fusion, batch))
        t_models.append(dt)
        t_solve.append(synced(device, lambda: fusion.solve(flat[0], flat[1], flat[2:]))[0])
        del flat
        t_fused.append(synced(device, lambda: fusion(batch))[0])
    flat = forwards_only(fusion, batch)
    peak = peak_solver_bytes(fusion, flat, device)

    n_rows, chunk = args.batch * args.seq, min(args.chunk_rows, args.batch * args.seq)
    cast = 0 if dtype == torch.float32 else 1
    bound = (n_rows * vocab * flat[0].element_size() + (args.experts + 2 * cast + 4) * chunk * vocab * 4
             + 8 * (4 * args.experts + 16) * n_rows)
    med = {k: statistics.median(v) for k, v in (("models", t_models), ("fused", t_fused), ("solve", t_solve))}
    summary = {
        "size": args.size, "device": str(device), "dtype": args.dtype, "mode": args.mode, "experts": args.experts,
        "positions": n_rows, "vocab": vocab, "chunk_rows": chunk, "repeats": args.repeats,
        "models_forward_s": round(med["models"], 4), "fused_source_s": round(med["fused"], 4),
        "solver_s": round(med["solve"], 4), "overhead_ratio": round(med["fused"] / med["models"], 3),
        "solver_peak_extra_mb": round(peak / 2**20, 1), "bound_mb": round(bound / 2**20, 1),
        "within_bound": peak <= bound,
    }
    print(f"fused source {med['fused'] * 1e3:.1f} ms vs its models' forwards {med['models'] * 1e3:.1f} ms: "
          f"x{summary['overhead_ratio']} (solver alone {med['solve'] * 1e3:.1f} ms); solver peak extra "
          f"{summary['solver_peak_extra_mb']} MB, bound {summary['bound_mb']} MB")
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
