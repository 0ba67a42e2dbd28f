"""Benchmark kd's KL kernels against eager PyTorch, torch.compile, Liger-Kernel and the floor, in one run.

For every config it times one forward + backward and measures the peak extra memory (CUDA allocator peak minus what
was allocated before the call: inputs excluded, gradients and temporaries included) of:

- fused-linear configs (N, Hs, Ht, V): kd's `fused_linear_divergence`; eager PyTorch (both lm_head GEMMs, the eager
  divergence of kd.losses.functional on N x V logits, autograd); torch.compile of that same eager function; Liger's
  LigerFusedLinearJSD when liger-kernel is installed (jsd; forward_kl as its beta = 0 where supported); and the
  floor = the four cuBLAS GEMMs alone (student logits, teacher logits, grad input, grad weight);
- dense configs (N, V): kd's `dense_loss` (what DivergenceLoss runs), eager, torch.compile, Liger's JSD / KL-div when installed, and the
  floor = one elementwise pass measured in the same run that reads both logit arrays and writes one (the bytes the
  one-pass kernel must move); kd's "x floor" is issue 17's ratio (goal <= 1.25 at N = 8192, V = 128256 bf16).

- sparse configs (N, V, K), a stored top-k teacher (issue 15): kd's `sparse_loss` (what DivergenceLoss runs on
  LossInputs.teacher_sparse), the eager spec (kd.losses.functional.sparse_divergence, autograd), torch.compile of it,
  kd's `dense_loss` on full teacher logits of the same shape (what the online teacher's loss costs), and the floor =
  one elementwise pass that reads the student logits and writes one array (the sparse kernel's bytes: the k stored
  entries per row are noise next to V). Default on a GPU: 8192,128256,64; on a CPU only when --sparse is given.

Ratios are to the floor. kd's kernel runs every divergence (--divergences); the baselines run --baseline-divergences.

    python tools/bench_kernels.py                                   # the issue's configs, on a GPU (H100/H200)
    python tools/bench_kernels.py --json bench.json                 # also write every number as JSON
    python tools/bench_kernels.py --fused 64,32,48,1031 --dense 64,1031 --iters 2   # tiny, runs on a CPU too
    python tools/bench_kernels.py --fused '' --dense '' --sparse 8192,128256,64      # only the sparse rows

Without a GPU the defaults are far too large: pass tiny configs (kd then runs its torch path unless
TRITON_INTERPRET=1 and --backend triton; CPU memory is not measured).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kd.losses.functional import DIVERGENCES, sparse_divergence  # noqa: E402
from kd.ops import dense_loss, fused_linear_divergence, sparse_loss  # noqa: E402

DEFAULT_FUSED = "8192,2048,4096,128256;16384,2048,4096,151936;4096,896,1536,151936"
DEFAULT_DENSE = "8192,128256"
DEFAULT_SPARSE = "8192,128256,64"  # on a GPU only (see --sparse)
GIB = 1024 ** 3


def parse_configs(text: str, arity: int) -> list[tuple[int, ...]]:
    """``"a,b,c;d,e,f"`` -> [(a, b, c), (d, e, f)]; an empty string gives no configs."""
    configs = [tuple(int(x) for x in part.split(",")) for part in text.split(";") if part.strip()]
    for c in configs:
        if len(c) != arity:
            raise SystemExit(f"config {c} needs {arity} numbers")
    return configs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], None], device: torch.device, warmup: int, iters: int) -> dict:
    """Median time (ms) of ``fn`` over ``iters`` runs after ``warmup``, and the peak extra memory of one run."""
    try:
        for _ in range(warmup):
            fn()
        _sync(device)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            fn()
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        times = []
        for _ in range(iters):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"ms": statistics.median(times), "peak_extra_bytes": peak}
    except torch.cuda.OutOfMemoryError:
        return {"ms": None, "peak_extra_bytes": None, "note": "OOM"}
    except Exception as exc:  # a baseline that cannot run here (compiler, Liger version) is reported, not fatal
        return {"ms": None, "peak_extra_bytes": None, "note": f"{type(exc).__name__}: {str(exc)[:120]}"}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _liger_module(factory: Callable[[], torch.nn.Module]):
    """A Liger module, or the reason it cannot be built (versions differ in what they accept)."""
    try:
        return factory(), None
    except Exception as exc:  # e.g. an older LigerFusedLinearJSD asserts 0 < beta < 1
        return None, {"ms": None, "peak_extra_bytes": None, "note": f"{type(exc).__name__}: {str(exc)[:120]}"}


def _liger():
    try:
        import liger_kernel.transformers as liger
        return liger
    except Exception:  # not installed, or not importable on this machine
        return None


def eager_fused(hs, ws, ht, wt, mask, name, n):
    """The eager reference from hidden states: full N x V logits, eager divergence, mean over loss tokens."""
    zs = hs @ ws.t()
    with torch.no_grad():
        zt = ht @ wt.t()
    per_row = DIVERGENCES[name](zs, zt)
    return torch.where(mask, per_row, 0.0).sum() / n


def eager_dense(s, t, mask, name, n):
    return torch.where(mask, DIVERGENCES[name](s, t), 0.0).sum() / n


def _backward(params: list[torch.Tensor], loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        loss_fn().backward()
    return run


def bench_fused(cfg, args, device, dtype, liger) -> list[dict]:
    n, hs_dim, ht_dim, vocab = cfg
    gen = torch.Generator(device=device).manual_seed(0)
    hs = (torch.randn(n, hs_dim, device=device, dtype=dtype, generator=gen)).requires_grad_(True)
    ws = (torch.randn(vocab, hs_dim, device=device, dtype=dtype, generator=gen) * hs_dim ** -0.5).requires_grad_(True)
    ht = torch.randn(n, ht_dim, device=device, dtype=dtype, generator=gen)
    wt = torch.randn(vocab, ht_dim, device=device, dtype=dtype, generator=gen) * ht_dim ** -0.5
    labels = torch.randint(0, vocab, (n,), device=device, generator=gen)
    mask = labels >= 0
    count = float(n)
    records = []

    def add(method, name, result):
        records.append({"kind": "fused", "config": {"N": n, "Hs": hs_dim, "Ht": ht_dim, "V": vocab},
                        "divergence": name, "method": method, **result})

    def floor() -> None:
        with torch.no_grad():
            zs = hs @ ws.t()
            _ = ht @ wt.t()
            _ = zs @ ws  # grad input: [N, V] x [V, Hs]
            _ = zs.t() @ hs  # grad weight: [V, N] x [N, Hs]

    add("floor", "-", measure(floor, device, args.warmup, args.iters))
    for name in args.divergences:
        add("kd", name, measure(_backward([hs, ws], lambda: fused_linear_divergence(
            hs, ws, mask, labels, teacher_hidden=ht, teacher_weight=wt, divergence=name, normalizer=count,
            backend=args.backend, chunk_size=args.chunk_size).loss), device, args.warmup, args.iters))
    for name in args.baseline_divergences:
        add("eager", name, measure(_backward([hs, ws], lambda: eager_fused(hs, ws, ht, wt, mask, name, count)),
                                   device, args.warmup, args.iters))
        if args.compile:
            compiled = torch.compile(eager_fused)
            add("torch.compile", name, measure(_backward([hs, ws], lambda: compiled(hs, ws, ht, wt, mask, name, count)),
                                               device, args.warmup, args.iters))
        if liger is not None and name in ("jsd", "forward_kl") and device.type == "cuda":
            beta = 0.5 if name == "jsd" else 0.0  # Liger's generalized JSD: beta = 0 is forward KL in recent versions
            module, failed = _liger_module(lambda: liger.LigerFusedLinearJSD(jsd_beta=beta, temperature=1.0))
            add("liger", name, failed or measure(_backward([hs, ws], lambda: module(hs, ws, ht, wt)), device,
                                                 args.warmup, args.iters))
    return records


def bench_dense(cfg, args, device, dtype, liger) -> list[dict]:
    n, vocab = cfg
    gen = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, vocab, device=device, dtype=dtype, generator=gen) * 2).requires_grad_(True)
    t = torch.randn(n, vocab, device=device, dtype=dtype, generator=gen) * 2
    mask = torch.ones(n, dtype=torch.bool, device=device)
    count = float(n)
    must_move = 3 * n * vocab * s.element_size()  # read both rows, write the gradient
    out = torch.empty_like(t)
    records = []

    def add(method, name, result):
        records.append({"kind": "dense", "config": {"N": n, "V": vocab}, "divergence": name, "method": method,
                        **result})

    # The floor, measured here in the same run: one elementwise pass that reads both logit arrays once and writes
    # one array of the same size, i.e. exactly the bytes the one-pass kernel must move (issue 17's 1.25x goal).
    floor = measure(lambda: torch.add(s.detach(), t, out=out), device, args.warmup, args.iters)
    add("floor", "-", {**floor, "peak_extra_bytes": 0,
                       "note": f"read both + write one: {must_move / 1e9:.2f} GB, "
                               f"{must_move / (floor['ms'] * 1e-3) / 1e12:.2f} TB/s"})
    labels = torch.zeros(n, dtype=torch.long, device=device)
    for name in args.divergences:
        # what DivergenceLoss runs: dense_loss with the gradient stored at the trainer's scale (1 / tokens here),
        # so backward has nothing to do
        add("kd", name, measure(_backward([s], lambda: dense_loss(
            s, t, mask, labels, divergence=name, grad_scale=1.0 / count, backend=args.backend).loss / count),
            device, args.warmup, args.iters))
    for name in args.baseline_divergences:
        add("eager", name, measure(_backward([s], lambda: eager_dense(s, t, mask, name, count)), device, args.warmup,
                                   args.iters))
        if args.compile:
            compiled = torch.compile(eager_dense)
            add("torch.compile", name, measure(_backward([s], lambda: compiled(s, t, mask, name, count)), device,
                                               args.warmup, args.iters))
        if liger is not None and name in ("jsd", "forward_kl") and device.type == "cuda":
            # Liger's dense losses take log-probabilities: the log_softmax of both sides is part of its cost.
            module, failed = _liger_module(lambda: liger.LigerJSD(beta=0.5) if name == "jsd"
                                           else liger.LigerKLDIVLoss(reduction="sum", log_target=True))
            add("liger", name, failed or measure(_backward([s], lambda: module(
                torch.log_softmax(s.float(), -1), torch.log_softmax(t.float(), -1)) / count), device, args.warmup,
                args.iters))
    return records


def eager_sparse(s, ids, lp, tail, mask, name, n):
    return torch.where(mask, sparse_divergence(s, ids, lp, tail, divergence=name), 0.0).sum() / n


def bench_sparse(cfg, args, device, dtype) -> list[dict]:
    n, vocab, k = cfg
    gen = torch.Generator(device=device).manual_seed(0)
    s = (torch.randn(n, vocab, device=device, dtype=dtype, generator=gen) * 2).requires_grad_(True)
    t = torch.randn(n, vocab, device=device, dtype=dtype, generator=gen) * 2
    lp_full = torch.log_softmax(t.float(), -1)
    lp, ids = lp_full.topk(k, dim=-1)  # a store of this teacher: its top-k and the log of the rest
    tail = torch.logsumexp(lp_full.scatter(-1, ids, float("-inf")), -1)
    del lp_full
    mask = torch.ones(n, dtype=torch.bool, device=device)
    labels = torch.zeros(n, dtype=torch.long, device=device)
    count = float(n)
    out = torch.empty_like(t)
    records = []

    def add(method, name, result):
        records.append({"kind": "sparse", "config": {"N": n, "V": vocab, "K": k}, "divergence": name,
                        "method": method, **result})

    must_move = 2 * n * vocab * s.element_size()  # read the student's rows, write the gradient
    floor = measure(lambda: torch.neg(s.detach(), out=out), device, args.warmup, args.iters)
    add("floor", "-", {**floor, "peak_extra_bytes": 0,
                       "note": f"read one + write one: {must_move / 1e9:.2f} GB, "
                               f"{must_move / (floor['ms'] * 1e-3) / 1e12:.2f} TB/s"})
    for name in args.divergences:
        add("kd", name, measure(_backward([s], lambda: sparse_loss(
            s, ids, lp, tail, mask, labels, divergence=name, grad_scale=1.0 / count, backend=args.backend).loss
            / count), device, args.warmup, args.iters))
    for name in args.baseline_divergences:
        add("eager", name, measure(_backward([s], lambda: eager_sparse(s, ids, lp, tail, mask, name, count)), device,
                                   args.warmup, args.iters))
        if args.compile:
            compiled = torch.compile(eager_sparse)
            add("torch.compile", name, measure(_backward([s], lambda: compiled(s, ids, lp, tail, mask, name, count)),
                                               device, args.warmup, args.iters))
        add("kd dense", name, measure(_backward([s], lambda: dense_loss(
            s, t, mask, labels, divergence=name, grad_scale=1.0 / count, backend=args.backend).loss / count),
            device, args.warmup, args.iters))
    return records


def add_ratios(records: list[dict]) -> None:
    """ratio_to_floor for every timed record; ratio_to_forward_kl for kd's other divergences."""
    floors = {(r["kind"], json.dumps(r["config"])): r["ms"] for r in records if r["method"] == "floor"}
    fkl = {(r["kind"], json.dumps(r["config"])): r["ms"] for r in records
           if r["method"] == "kd" and r["divergence"] == "forward_kl"}
    for r in records:
        key = (r["kind"], json.dumps(r["config"]))
        if r["ms"] is not None and floors.get(key):
            r["ratio_to_floor"] = r["ms"] / floors[key]
        if r["method"] == "kd" and r["ms"] is not None and fkl.get(key):
            r["ratio_to_forward_kl"] = r["ms"] / fkl[key]


def print_table(records: list[dict]) -> None:
    header = f"{'kind':6} {'config':28} {'divergence':16} {'method':14} {'ms':>9} {'x floor':>8} {'x fkl':>6} " \
             f"{'extra GiB':>9}  note"
    print(header)
    print("-" * len(header))
    for r in records:
        cfg = ",".join(str(v) for v in r["config"].values())
        ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
        ratio = f"{r['ratio_to_floor']:.2f}" if "ratio_to_floor" in r else "-"
        rfkl = f"{r['ratio_to_forward_kl']:.2f}" if "ratio_to_forward_kl" in r else "-"
        mem = f"{r['peak_extra_bytes'] / GIB:.2f}" if r.get("peak_extra_bytes") is not None else "-"
        print(f"{r['kind']:6} {cfg:28} {r['divergence']:16} {r['method']:14} {ms:>9} {ratio:>8} {rfkl:>6} {mem:>9}  "
              f"{r.get('note', '')}")


def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fused", default=DEFAULT_FUSED, help="fused-linear configs N,Hs,Ht,V separated by ';'")
    parser.add_argument("--dense", default=DEFAULT_DENSE, help="dense configs N,V separated by ';'")
    parser.add_argument("--sparse", default=None, help="sparse-target configs N,V,K separated by ';' (default: "
                        f"{DEFAULT_SPARSE} on a GPU, none on a CPU)")
    parser.add_argument("--divergences", default=",".join(DIVERGENCES), help="divergences of kd's kernels")
    parser.add_argument("--baseline-divergences", default="forward_kl,jsd", help="divergences of the baselines")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"], help="kd's backend")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk of the fused kernel")
    parser.add_argument("--block", type=int, default=None, help="Triton BLOCK over the vocabulary (tuning)")
    parser.add_argument("--warps", type=int, default=None, help="Triton num_warps (tuning)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--no-liger", dest="liger", action="store_false", help="skip Liger-Kernel")
    parser.add_argument("--json", type=Path, default=None, help="write the records to this JSON file")
    args = parser.parse_args(argv)
    args.divergences = [d for d in args.divergences.split(",") if d]
    args.baseline_divergences = [d for d in args.baseline_divergences.split(",") if d]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fused, dense = parse_configs(args.fused, 4), parse_configs(args.dense, 2)
    sparse = parse_configs(args.sparse if args.sparse is not None else
                           DEFAULT_SPARSE if device.type == "cuda" else "", 3)
    if device.type == "cpu" and (args.fused == DEFAULT_FUSED or args.dense == DEFAULT_DENSE):
        raise SystemExit("no CUDA device: the default configs need a GPU; pass tiny --fused and --dense configs")
    if args.block or args.warps:
        from kd.ops import dense_kl
        dense_kl.TUNING.update({k: v for k, v in (("block", args.block), ("num_warps", args.warps)) if v})
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    liger = _liger() if args.liger else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}   dtype: {args.dtype}   liger: {'yes' if liger else 'no'}   torch {torch.__version__}")
    records = []
    for cfg in fused:
        records += bench_fused(cfg, args, device, dtype, liger)
    for cfg in dense:
        records += bench_dense(cfg, args, device, dtype, liger)
    for cfg in sparse:
        records += bench_sparse(cfg, args, device, dtype)
    add_ratios(records)
    print_table(records)
    if args.json is not None:
        args.json.write_text(json.dumps({"device": name, "dtype": args.dtype, "torch": torch.__version__,
                                         "records": records}, indent=1))
    return records


if __name__ == "__main__":
    main()
