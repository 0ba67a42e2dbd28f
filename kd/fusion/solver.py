"""The per-position weight search of dynamic logit fusion, batched over positions.

Notation for one position (a row of the [N, V] logits): z_L, z_S, z_t the logits of the large base, the small base
and expert t = 1..T; P, Q, Q_t their softmaxes; d_t = z_t - z_S what fine-tuning taught expert t. The fused logits for
weights a are

    f(a) = z_L + sum_t a_t d_t,      P~(a) = softmax(f(a)),

and the weights are chosen so that the fused model moves away from the large base as far as each expert moved away
from the small base, in both KL directions:

    J(a) = sum_t [ (KL(P~ || P) - KL(Q_t || Q))^2 + (KL(P || P~) - KL(Q || Q_t))^2 ]
    a*   = argmin over the candidates of J(a).

Modes (the candidates, kd.fusion.grid, in tie-breaking order: first minimum wins, so a flat J gives a = 0):
- ``single`` (the paper's): one expert active, a = c e_t for every expert t and grid value c; the winner is the
  candidate with the lowest J over all T x G of them (J keeps every expert's terms, also for the inactive ones).
- ``joint``: every a in grid^T for T <= 2; for more experts, coordinate descent from a = 0 (each sweep sets each a_t
  to its best grid value with the others fixed) until a full sweep changes nothing or `sweeps` sweeps ran. J never
  increases, so a local minimum of the grid; not always the global one.
- ``static`` (proxy-tuning): a fixed a (default 1 per expert); J is still computed, for the logs.

Cost and memory. Rows are solved `chunk_rows` at a time, so at most (T + 4) x chunk_rows x V values of the compute
dtype (fp32) are alive at once for fp32 logits (T + 6 for bf16 logits, +1 in coordinate descent; derived and measured
in tools/bench_fusion.py); the candidates are a Python loop (T x G or G^T passes over each chunk), the positions
never are. Only the fused logits [N, V] (in the large base's dtype) and [N]/[N, T] results are kept.
Logits must be finite (-inf entries make d_t NaN).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch

from kd.errors import UserError
from kd.fusion import grid as fgrid

Mode = Literal["single", "joint", "static"]
MODES = ("single", "joint", "static")
DEFAULT_GRID = fgrid.grid_points()
DEFAULT_SWEEPS = 10


@dataclass(frozen=True)
class FusionResult:
    """The solver's answer for N positions (no grad).

    ``weights`` [N, T] a* (compute dtype); ``logits`` [N, V] f(a*) in the large base's dtype; ``objective`` [N] J(a*);
    ``kl_to_large`` [N] KL(P~ || P) at a*; ``selected`` [N] long: in single mode the active expert, -1 where a* = 0
    (and everywhere in the other modes)."""

    weights: torch.Tensor
    logits: torch.Tensor
    objective: torch.Tensor
    kl_to_large: torch.Tensor
    selected: torch.Tensor


def fuse_logits(large: torch.Tensor, small: torch.Tensor, experts: Sequence[torch.Tensor], *, mode: Mode = "single",
                grid: Sequence[float] = DEFAULT_GRID, static_weights: Optional[Sequence[float]] = None,
                chunk_rows: int = 512, sweeps: int = DEFAULT_SWEEPS,
                compute_dtype: torch.dtype = torch.float32, key: str = "teacher.fusion") -> FusionResult:
    """Fuse [N, V] logits of the large base, the small base and T experts (any float dtypes, one device).

    `grid`: the values each a_t may take (see kd.fusion.grid.grid_points); `static_weights`: a for mode static
    (default 1 per expert); `key`: the recipe section named in errors."""
    num = _check_inputs(large, small, experts, mode, grid, static_weights, chunk_rows, key)
    rows, vocab = large.shape
    with torch.no_grad():
        out_logits = torch.empty_like(large)
        weights = torch.empty(rows, num, dtype=compute_dtype, device=large.device)
        objective = torch.empty(rows, dtype=compute_dtype, device=large.device)
        kl_to_large = torch.empty_like(objective)
        for start in range(0, rows, chunk_rows):
            part = slice(start, min(start + chunk_rows, rows))
            chunk = _Chunk(large[part], small[part], [e[part] for e in experts], compute_dtype)
            if mode == "static":
                a = torch.tensor(list(static_weights) if static_weights is not None else [1.0] * num,
                                 dtype=compute_dtype, device=large.device).expand(chunk.rows, num)
            elif mode == "joint" and num > fgrid.FULL_JOINT_MAX_EXPERTS:
                a = chunk.coordinate_descent(grid, sweeps)
            else:
                cands = fgrid.single_candidates(grid, num) if mode == "single" else fgrid.joint_candidates(grid, num)
                a = chunk.best_of(cands)
            fused = chunk.fused(a)
            j, kl = chunk.objective(fused, a)
            out_logits[part] = fused.to(large.dtype)
            weights[part], objective[part], kl_to_large[part] = a, j, kl
            del chunk, fused  # now: else they stay alive while the next chunk is built (twice the memory)
        active = weights != 0
        if mode == "single":
            selected = torch.where(active.any(-1), active.float().argmax(-1), -1)
        else:
            selected = torch.full((rows,), -1, dtype=torch.long, device=large.device)
    return FusionResult(weights=weights, logits=out_logits, objective=objective, kl_to_large=kl_to_large,
                        selected=selected.long())


class _Chunk:
    """One block of rows, upcast once. Kept: z_L, the directions d_t = z_t - z_S, and per row the scalars
    lse_L = logsumexp(z_L), m_t = E_P[d_t] and the targets r_t = KL(Q_t || Q), s_t = KL(Q || Q_t).

    With g = f(a) - z_L = sum_t a_t d_t and lse_f = logsumexp(f(a)), log P~ - log P = g - (lse_f - lse_L), so
        KL(P~ || P) = E_P~[g] - (lse_f - lse_L),      KL(P || P~) = (lse_f - lse_L) - E_P[g],
    E_P[g] = sum_t a_t m_t is known for free, and with u = exp(f - max f) (in place of f when f is a scratch copy),
    lse_f = max f + log sum u and E_P~[d_t] = (u . d_t) / sum u: a candidate costs a max, one exp, one sum and one
    dot product per active d_t over V, and one [n, V] block (see tools/bench_fusion.py for the memory bound)."""

    def __init__(self, large, small, experts, dtype):
        self.z_large = large.to(dtype)
        # the same ops as every candidate's lse (_exp_shifted), so that a = 0 gives lse_f == lse_L bit for bit
        self.lse_large = _exp_shifted(self.z_large, consume=False)[1]
        z_small = small.to(dtype)
        log_q = torch.log_softmax(z_small, -1)
        q = log_q.exp()
        self.d, r, s = [], [], []
        for expert in experts:
            z_t = expert.to(dtype, copy=True)  # a copy: it becomes d_t in place below, the input stays as it was
            log_qt = torch.log_softmax(z_t, -1)
            q_t = log_qt.exp()
            diff = log_qt.sub_(log_q)  # log Q_t - log Q, in place: log Q_t is not needed any more
            r.append(_dot(q_t, diff))
            del q_t
            s.append(-_dot(q, diff))
            del diff
            self.d.append(z_t.sub_(z_small))  # in place: z_t is not needed any more
        del z_small, log_q, q  # before P is made: they and P are never alive together
        p = torch.softmax(self.z_large, -1)
        m = [_dot(p, d) for d in self.d]
        del p
        self.r, self.s, self.m = torch.stack(r, -1), torch.stack(s, -1), torch.stack(m, -1)  # [n, T]
        self.num = len(experts)
        self.rows = large.shape[0]

    def objective(self, f: torch.Tensor, a, *, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """J and KL(P~ || P) for fused logits f = f(a) [n, V]; `a`: constant weights (floats) or per-row [n, T].
        ``consume``: f is scratch, overwritten (no second [n, V] block)."""
        u, lse, total = _exp_shifted(f, consume=consume)
        g_fused = torch.zeros_like(lse)  # E_P~[g]
        g_large = torch.zeros_like(lse)  # E_P[g]
        for t, d in enumerate(self.d):
            c = a[t] if not torch.is_tensor(a) else a[:, t]
            if (c == 0) if not torch.is_tensor(c) else not bool((c != 0).any()):
                continue  # skipped terms: a = 0 gives KL = 0 exactly (lse == lse_L bit for bit)
            g_fused += c * _dot(u, d) / total
            g_large += c * self.m[:, t]
        shift = lse - self.lse_large
        # clamp: both are KLs (>= 0); the rounding of lse_f - lse_L may leave -1e-7 where the fused model barely moved
        kl_fused_large = (g_fused - shift).clamp_(min=0)  # KL(P~ || P)
        kl_large_fused = (shift - g_large).clamp_(min=0)  # KL(P || P~)
        # the differences directly, not T D1^2 - 2 D1 sum r + sum r^2: that form cancels when J is small
        j = ((kl_fused_large[:, None] - self.r).square() + (kl_large_fused[:, None] - self.s).square()).sum(-1)
        return j, kl_fused_large

    def fused(self, a: torch.Tensor) -> torch.Tensor:
        """f(a) for per-row weights a [n, T]. Terms with a_t = 0 everywhere are skipped, so a = 0 is z_L exactly."""
        f = self.z_large.clone()
        for t, d in enumerate(self.d):
            col = a[:, t:t + 1]
            if bool((col != 0).any()):
                f.addcmul_(d, col)  # in place, no [n, V] temporary for col * d
        return f

    def _fused_const(self, a: Sequence[float]) -> torch.Tensor:
        f = None
        for c, d in zip(a, self.d):
            if c != 0:  # the first term makes the copy: z_L + c d in one op, not a clone and an add
                f = torch.add(self.z_large, d, alpha=c) if f is None else f.add_(d, alpha=c)
        return self.z_large.clone() if f is None else f

    def best_of(self, candidates: Sequence[Sequence[float]]) -> torch.Tensor:
        """Per row, the first candidate (in the given order) with the lowest J: [n, T]."""
        best_j = torch.full((self.rows,), float("inf"), dtype=self.z_large.dtype, device=self.z_large.device)
        best = torch.zeros(self.rows, dtype=torch.long, device=self.z_large.device)
        for k, a in enumerate(candidates):
            j, _ = self.objective(self._fused_const(a), a, consume=True)
            better = j < best_j  # strict: an equal J later in the order does not replace an earlier candidate
            best_j = torch.where(better, j, best_j)
            best = torch.where(better, k, best)
        table = torch.tensor(candidates, dtype=self.z_large.dtype, device=self.z_large.device)
        return table[best]

    def coordinate_descent(self, values: Sequence[float], sweeps: int) -> torch.Tensor:
        """Joint mode for many experts: from a = 0, each a_t in turn takes its best grid value with the others
        fixed (ties: kd.fusion.grid.preference_order), until a sweep changes no row or `sweeps` sweeps ran. A row
        that a sweep leaves unchanged stays unchanged, so running the others on does not alter it."""
        order = fgrid.preference_order(values)
        a = torch.zeros(self.rows, self.num, dtype=self.z_large.dtype, device=self.z_large.device)
        if 0 not in values:  # start inside the grid: the value closest to 0 (the tie rule's favourite)
            a.fill_(order[0])
        table = torch.tensor(order, dtype=a.dtype, device=a.device)
        for _ in range(sweeps):
            before = a.clone()
            for t in range(self.num):
                others = a.clone()
                others[:, t] = 0
                base = self.fused(others)
                best_j = torch.full((self.rows,), float("inf"), dtype=a.dtype, device=a.device)
                best = torch.zeros(self.rows, dtype=torch.long, device=a.device)
                for k, c in enumerate(order):
                    f = base if c == 0 else torch.add(base, self.d[t], alpha=c)
                    col = others.clone()
                    col[:, t] = c
                    j, _ = self.objective(f, col, consume=c != 0)  # base itself is needed for the next c
                    better = j < best_j
                    best_j = torch.where(better, j, best_j)
                    best = torch.where(better, k, best)
                a[:, t] = table[best]
            if torch.equal(a, before):  # one host sync per sweep, not per position
                break
        return a


def _exp_shifted(f: torch.Tensor, *, consume: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, lse, sum u): u = exp(f - max f) [n, V] (in f's own storage when ``consume``), lse = logsumexp(f) [n]."""
    top = f.amax(-1, keepdim=True)
    u = (f.sub_(top) if consume else f - top).exp_()
    total = u.sum(-1)
    return u, top.squeeze(-1) + total.log(), total


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise sum_v x[n, v] * y[n, v] -> [n], as a batched matrix product: no [n, V] product tensor."""
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).reshape(-1)


def _check_inputs(large, small, experts, mode, grid, static_weights, chunk_rows, key) -> int:
    """The number of experts, after checking what the caller passed (UserError for what a recipe sets)."""
    if mode not in MODES:
        raise UserError(f"unknown fusion mode {mode!r}; use one of {', '.join(MODES)}", key=f"{key}.mode")
    if len(experts) == 0:
        raise UserError("fusion needs at least one expert (a fine-tune of the small base)", key=f"{key}.experts")
    if mode != "static" and (len(grid) == 0 or not all(isinstance(c, (int, float)) for c in grid)):
        raise UserError(f"the fusion grid is empty or not numbers ({list(grid)!r})", key=f"{key}.grid")
    if static_weights is not None and len(static_weights) != len(experts):
        raise UserError(f"{len(static_weights)} static weights for {len(experts)} experts: give one per expert",
                        key=f"{key}.static_weights")
    if chunk_rows < 1:
        raise UserError(f"chunk_rows must be >= 1 (got {chunk_rows})", key=f"{key}.chunk_rows")
    for name, z in (("small base", small), *((f"expert {i}", e) for i, e in enumerate(experts))):
        if z.shape != large.shape or z.device != large.device:
            raise ValueError(f"fuse_logits: the {name}'s logits are {tuple(z.shape)} on {z.device}, the large base's "
                             f"{tuple(large.shape)} on {large.device}: cut all to one vocabulary first")
    if large.dim() != 2:
        raise ValueError(f"fuse_logits: expected [N, V] logits, got shape {tuple(large.shape)}")
    return len(experts)
