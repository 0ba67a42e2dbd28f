"""Eager per-token divergences between a student and a teacher distribution: the spec and the CPU path.

Every divergence takes ``(student_logits, teacher_logits, *, temperature=1.0, ...)`` with shapes ``[..., V]`` (any
leading dims), and returns one value per position, shape ``[...]``. Notation used in the docstrings:

    p = softmax(teacher_logits / T)    (teacher)
    q = softmax(student_logits / T)    (student)

Conventions shared by all functions here:

- Computation is in fp32 whatever the input dtype (bf16 logits are upcast first): the sums over V of small terms
  are where bf16 loses the signal. Log-probabilities come from ``log_softmax`` so no ``log(softmax(x))`` underflows.
- The teacher is detached inside each function: gradients flow to ``student_logits`` only, so a caller cannot train
  the teacher by accident.
- No ``T**2`` factor. Hinton et al. (2015) multiply the soft loss by ``T**2`` to keep gradient magnitudes comparable
  across temperatures; we leave that choice to the caller (fold it into the learning rate or a loss weight), so the
  functions compute exactly the divergence their name says.
- A term whose weight is exactly zero (``p_v = 0`` in ``sum_v p_v log(...)``) contributes 0, not NaN, so teacher
  logits of ``-inf`` (masked vocabulary entries) are allowed.

The Triton kernels in ``kd.ops`` are tested against these functions.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.ops.spec import IGNORE_INDEX


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    """fp32 ``log_softmax(logits / T)`` over the last dim (upcast before dividing, so bf16 rounding is not scaled)."""
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _kl_from_log_probs(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) = sum_v a_v (log a_v - log b_v) over the last dim, from log-probabilities.

    Positions with ``a_v == 0`` contribute 0 (the limit of ``x log x``). The log-ratio is zeroed there *before* the
    product, so neither the value (``0 * inf``) nor the gradient (``0 * inf`` again, in backward) becomes NaN when a
    log-probability is ``-inf``.
    """
    a = log_a.exp()
    log_ratio = torch.where(a > 0, log_a - log_b, torch.zeros_like(a))
    return (a * log_ratio).sum(dim=-1)


def _log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w * a + (1 - w) * b) from log-probabilities, stable (logaddexp of the log terms plus log weights).

    The degenerate weights return the pure side exactly, which avoids ``log(0)`` (skew KL at alpha = 0 or 1).
    """
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _attached_to_student(value: Tensor, log_q: Tensor) -> Tensor:
    """``value`` with a zero-valued link to the student, for degenerate weights where the value ignores the student.

    E.g. skew_kl with alpha = 1 is KL(p || p) = 0 whatever q is. Without the link the loss would have no grad_fn and a
    recipe with ce_weight = 0 would crash in backward; with it, backward gives a zero gradient. ``q`` (not ``log q``)
    is used because it is always finite, so ``0 * q`` cannot be NaN.
    """
    return value + 0.0 * log_q.exp().sum(dim=-1)


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL, the classic KD loss (Hinton et al., 2015): KL(p || q) = sum_v p_v (log p_v - log q_v).

    Mean-seeking: the student is pushed to cover every token the teacher gives mass to.
    Gradient w.r.t. the student logits: (q - p) / T.
    """
    log_p = _log_probs(teacher_logits.detach(), temperature)
    log_q = _log_probs(student_logits, temperature)
    return _kl_from_log_probs(log_p, log_q)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL (as in MiniLLM, Gu et al., 2024): KL(q || p) = sum_v q_v (log q_v - log p_v).

    Mode-seeking: the student is pushed to put its mass where the teacher is confident.
    """
    log_p = _log_probs(teacher_logits.detach(), temperature)
    log_q = _log_probs(student_logits, temperature)
    return _kl_from_log_probs(log_q, log_p)


def jsd(student_logits: Tensor, teacher_logits: Tensor, *, beta: float = 0.5, temperature: float = 1.0) -> Tensor:
    """Generalized Jensen-Shannon divergence (Agarwal et al., 2024, "On-Policy Distillation of Language Models", GKD).

        m = beta * p + (1 - beta) * q
        JSD_beta = beta * KL(p || m) + (1 - beta) * KL(q || m)           0 < beta < 1
        JSD_0 = KL(p || q) (forward_kl),   JSD_1 = KL(q || p) (reverse_kl)

    beta = 0.5 is the usual symmetric JSD, bounded by log 2. The ends follow TRL's GKD ``generalized_jsd_loss``
    (which this function matches to 6 digits inside (0, 1)): there m would equal one side and the formula above is
    identically 0, a loss that trains nothing, so beta = 0 and beta = 1 mean the two KLs instead. They are the
    limits of JSD_beta / beta (beta -> 0) and JSD_beta / (1 - beta) (beta -> 1): near an end the value is about
    beta (or 1 - beta) times the end's, so the gradient points the same way, scaled. The value itself jumps at the
    ends, as in TRL.

    Inside (0, 1) the two log-ratios d = log(m / q) and e = log(m / p) are each one logaddexp of the log-probability
    difference x = log p - log q and the log weights:  d = logaddexp(log(1 - beta), log(beta) + x),
    e = logaddexp(log(beta), log(1 - beta) - x), and JSD = -beta sum p e - (1 - beta) sum q d. Near beta = 0, d is
    of order beta and comes out to fp32 precision (log m - log q of two O(10) log-probabilities would lose it in
    the subtraction); near beta = 1 the same holds for e. So JSD_beta / beta is accurate down to beta = 1e-6.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature=temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature=temperature)
    return _jsd_from_log_probs(_log_probs(teacher_logits.detach(), temperature),
                               _log_probs(student_logits, temperature), beta)


def _jsd_from_log_probs(log_p: Tensor, log_q: Tensor, beta: float) -> Tensor:
    """`jsd` inside 0 < beta < 1 from log-probabilities (its docstring has the logaddexp forms used here)."""
    x = log_p - log_q  # -inf where the teacher masks an entry (the student's log-probabilities are finite)
    log_b, log_1mb = math.log(beta), math.log1p(-beta)
    d = torch.logaddexp(torch.full_like(x, log_1mb), x + log_b)
    e = torch.logaddexp(torch.full_like(x, log_b), log_1mb - x)  # +inf where p = 0: selected away below
    zero = torch.zeros_like(x)
    kl_p = torch.where(log_p > float("-inf"), log_p.exp() * -e, zero).sum(dim=-1)
    kl_q = (log_q.exp() * -d).sum(dim=-1)
    return beta * kl_p + (1.0 - beta) * kl_q


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance: 0.5 * sum_v |p_v - q_v|, in [0, 1] (used as a KD loss e.g. in GKD's ablations)."""
    p = _log_probs(teacher_logits.detach(), temperature).exp()
    q = _log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(dim=-1)


def skew_kl(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1, temperature: float = 1.0) -> Tensor:
    """Skew KL (SKL) of DistiLLM (Ko et al., 2024): KL(p || alpha * p + (1 - alpha) * q).

    Mixing a little of p into the student side keeps the divergence (and its gradient) bounded where q is tiny.
    alpha = 0 gives forward_kl; alpha = 1 gives 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew_kl: alpha must be in [0, 1], got {alpha}")
    log_p = _log_probs(teacher_logits.detach(), temperature)
    log_q = _log_probs(student_logits, temperature)
    value = _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))
    return _attached_to_student(value, log_q) if alpha >= 1.0 else value


def skew_reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, alpha: float = 0.1,
                    temperature: float = 1.0) -> Tensor:
    """Skew reverse KL (SRKL) of DistiLLM (Ko et al., 2024): KL(q || alpha * q + (1 - alpha) * p).

    alpha = 0 gives reverse_kl; alpha = 1 gives 0.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew_reverse_kl: alpha must be in [0, 1], got {alpha}")
    log_p = _log_probs(teacher_logits.detach(), temperature)
    log_q = _log_probs(student_logits, temperature)
    return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, alpha))


def cross_entropy(student_logits: Tensor, labels: Tensor, *, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-token cross-entropy -log softmax(student_logits)[label], 0 where ``labels == ignore_index``.

    ``student_logits`` is ``[..., V]`` and ``labels`` is ``[...]``; no temperature (this is the hard-label LM loss).
    Computed in fp32.
    """
    vocab = student_logits.shape[-1]
    per_token = F.cross_entropy(student_logits.float().reshape(-1, vocab), labels.reshape(-1),
                                ignore_index=ignore_index, reduction="none")
    return per_token.view(labels.shape)


def _taid_log_target(student_logits: Tensor, teacher_logits: Tensor, t: float, temperature: float) -> Tensor:
    """fp32 ``log p_t`` of TAID's target (see `taid_target`), computed with ``log_softmax`` of the mixed logits."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid: t must be in [0, 1], got {t}")
    z_s = student_logits.detach().float() / temperature
    z_t = teacher_logits.detach().float() / temperature
    # The pure ends are returned as they are: 0 * (-inf) would be NaN where the teacher masks a vocabulary entry.
    if t <= 0.0:
        mixed = z_s
    elif t >= 1.0:
        mixed = z_t
    else:
        mixed = (1.0 - t) * z_s + t * z_t
    return torch.log_softmax(mixed, dim=-1)


def taid_target(student_logits: Tensor, teacher_logits: Tensor, t: float, *, temperature: float = 1.0) -> Tensor:
    """TAID's intermediate target (Shing et al., ICLR 2025): an interpolation *in logit space*, in fp32,

        p_t = softmax((1 - t) * stopgrad(z_s / T) + t * z_t / T)        z_s, z_t: student, teacher logits

    t = 0 is the student's own (detached) distribution, t = 1 the teacher's. The temperature divides both logits
    before they are mixed (the same as dividing the mix, since the mix is linear). Both inputs are detached: the
    target never carries a gradient. ``t`` is a Python float (the loss keeps it on the host, so reading it costs no
    device sync). Returns probabilities of shape ``[..., V]``.
    """
    return _taid_log_target(student_logits, teacher_logits, t, temperature).exp()


def taid_kl(student_logits: Tensor, teacher_logits: Tensor, t: float, *, temperature: float = 1.0) -> Tensor:
    """TAID's per-token loss KL(p_t || q) = sum_v p_t,v (log p_t,v - log q_v), p_t = `taid_target`, q = softmax(z_s/T).

    p_t is a constant for autograd, so the gradient w.r.t. the student logits is (q - p_t) / T: the same as the
    cross-entropy -sum_v p_t,v log q_v, whose value differs by the entropy of p_t. The KL is used because it is 0 when
    the student matches the target, which makes the relative loss change that drives TAID's schedule meaningful.
    At t = 0 the value is exactly 0 (and the gradient 0 up to rounding).
    """
    log_target = _taid_log_target(student_logits, teacher_logits, t, temperature)
    return _kl_from_log_probs(log_target, _log_probs(student_logits, temperature))


Divergence = Callable[..., Tensor]

# The six divergences by recipe name (`loss.name`). jsd takes `beta`, the skew ones `alpha`; all take `temperature`.
DIVERGENCES: dict[str, Divergence] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": jsd,
    "tvd": tvd,
    "skew_kl": skew_kl,
    "skew_reverse_kl": skew_reverse_kl,
}


# ---------------------------------------------------------------------------------------------------------------------
# Sparse targets: a stored top-k teacher (kd.losses.base.SparseTarget) instead of teacher logits.
#
# The divergences run over K + 1 buckets: the k stored tokens and one tail bucket holding the rest of the vocabulary.
#
#     log p_b = target_logprobs[k] (b = k < K),   tail_logprob (b = K)       teacher, as stored (not renormalized)
#     log q_b = s_{id_k} - lse(s),                lse(s_rest) - lse(s)       student, s = z_s / T
#
# where s_rest are the student's logits off the k ids: its tail mass 1 - sum_k q_k comes from a logsumexp over the
# entries it holds, never from log(1 - sum), which cancels catastrophically when the top-k holds nearly everything.
# With tail="renormalize" both sides are renormalized over the k ids and the tail is ignored (axolotl's behaviour):
# log p_k - logsumexp_k(log p), s_{id_k} - logsumexp_k(s_{id_k}). With K = V (every id stored, tail -inf) both modes
# are the dense divergence of the same logits.

SPARSE_TAILS = ("bucket", "renormalize")

# Stand-in for the log-mass of a bucket that is empty on both sides (the tail when K = V). exp(-1e4) is exactly 0 in
# fp32, so its terms are exact 0s as with -inf, while the mixtures of jsd and the skew KLs (log m of two zero masses,
# log p - log q of two -inf) stay finite and so do their gradients. A bucket empty on one side only keeps its -inf,
# as in the dense formulas (reverse KL to a teacher with p_b = 0 < q_b is +inf).
_EMPTY_LOG_MASS = -1e4


def _logsumexp_or_ninf(x: Tensor) -> Tensor:
    """logsumexp over the last dim that is -inf, with a zero (not NaN) gradient, when every entry is -inf."""
    shift = x.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    total = (x - shift).exp().sum(dim=-1)
    held = total > 0
    return torch.where(held, torch.log(torch.where(held, total, torch.ones_like(total))) + shift.squeeze(-1),
                       torch.full_like(total, float("-inf")))


def _no_empty(log_q: Tensor, log_p: Tensor) -> tuple[Tensor, Tensor]:
    """Both log-masses of buckets empty on both sides replaced by `_EMPTY_LOG_MASS`."""
    empty = (log_q == float("-inf")) & (log_p == float("-inf"))
    floor = torch.full_like(log_q, _EMPTY_LOG_MASS)
    return torch.where(empty, floor, log_q), torch.where(empty, floor, log_p)


def sparse_buckets(student_logits: Tensor, target_ids: Tensor, target_logprobs: Tensor, tail_logprob: Tensor, *,
                   temperature: float = 1.0, tail: str = "bucket") -> tuple[Tensor, Tensor]:
    """(log q, log p) of the buckets, fp32 ``[..., K + 1]`` (tail last; ``[..., K]`` with tail="renormalize").

    ``student_logits [..., V]`` (any float dtype, with grad), ``target_ids [..., K]`` (integer, distinct ids of one
    position, any order, < V), ``target_logprobs [..., K]`` and ``tail_logprob [...]`` (teacher log-probabilities at
    the store's temperature, any float dtype, detached here). Entries may be -inf (an empty tail).
    """
    if tail not in SPARSE_TAILS:
        raise ValueError(f"tail must be one of {', '.join(SPARSE_TAILS)}, got {tail!r}")
    s = student_logits.float() / temperature
    target_ids = target_ids.long()  # a compact store may hand over int32 ids
    s_top = s.gather(-1, target_ids)
    log_p = target_logprobs.detach().float()
    if tail == "renormalize":
        return torch.log_softmax(s_top, dim=-1), torch.log_softmax(log_p, dim=-1)
    lse_rest = _logsumexp_or_ninf(s.scatter(-1, target_ids, float("-inf")))
    # lse over the whole row from its two parts: a sum of positive terms, no cancellation
    lse = torch.logaddexp(lse_rest, torch.logsumexp(s_top, dim=-1))
    log_q = torch.cat([s_top - lse.unsqueeze(-1), (lse_rest - lse).unsqueeze(-1)], dim=-1)
    return log_q, torch.cat([log_p, tail_logprob.detach().float().unsqueeze(-1)], dim=-1)


def _bucket_divergence(divergence: str, log_q: Tensor, log_p: Tensor, beta: float, alpha: float) -> Tensor:
    """The dense formulas of this module applied to bucket log-probabilities (`_EMPTY_LOG_MASS`: `_no_empty`)."""
    log_q, log_p = _no_empty(log_q, log_p)
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return _kl_from_log_probs(log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return _kl_from_log_probs(log_q, log_p)
    if divergence == "jsd":
        return _jsd_from_log_probs(log_p, log_q, beta)
    if divergence == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    if divergence == "skew_kl":
        value = _kl_from_log_probs(log_p, _log_mixture(log_p, log_q, alpha))
        return _attached_to_student(value, log_q) if alpha >= 1.0 else value
    if divergence == "skew_reverse_kl":
        return _kl_from_log_probs(log_q, _log_mixture(log_q, log_p, alpha))
    raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")


def sparse_divergence(student_logits: Tensor, target_ids: Tensor, target_logprobs: Tensor, tail_logprob: Tensor, *,
                      divergence: str, temperature: float = 1.0, tail: str = "bucket", beta: float = 0.5,
                      alpha: float = 0.1) -> Tensor:
    """A divergence of `DIVERGENCES` between the student and a stored top-k teacher, one value per position ``[...]``.

    The same formula as the dense function of that name (same conventions: fp32, teacher detached, no T^2,
    0 log 0 = 0), over the K + 1 buckets of `sparse_buckets` (the K ids renormalized with tail="renormalize").
    The student's logits are divided by ``temperature``; the stored log-probs are already at the store's.
    With K = V it equals the dense divergence of the same logits. ``beta``: jsd; ``alpha``: the skew KLs.
    """
    if not (0.0 <= beta <= 1.0 and 0.0 <= alpha <= 1.0):
        raise ValueError(f"beta and alpha must be in [0, 1], got beta={beta}, alpha={alpha}")
    log_q, log_p = sparse_buckets(student_logits, target_ids, target_logprobs, tail_logprob,
                                  temperature=temperature, tail=tail)
    return _bucket_divergence(divergence, log_q, log_p, beta, alpha)


def sparse_taid_log_target(log_q: Tensor, log_p: Tensor, t: float) -> Tensor:
    """TAID's target over the buckets (see `sparse_taid_kl`), fp32 log-probabilities, detached."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid: t must be in [0, 1], got {t}")
    log_q, log_p = log_q.detach(), log_p.detach()
    if t <= 0.0:
        mixed = log_q
    elif t >= 1.0:
        mixed = log_p
    else:  # an empty bucket on either side stays empty: (1 - t) * (-inf) + t * x is -inf for 0 < t < 1
        empty = (log_q == float("-inf")) | (log_p == float("-inf"))
        mixed = torch.where(empty, torch.full_like(log_q, float("-inf")), (1.0 - t) * log_q + t * log_p)
    return torch.log_softmax(mixed, dim=-1)


def sparse_taid_kl(student_logits: Tensor, target_ids: Tensor, target_logprobs: Tensor, tail_logprob: Tensor,
                   t: float, *, temperature: float = 1.0, tail: str = "bucket") -> Tensor:
    """TAID on a stored top-k teacher: KL(p_t || q) over the buckets of `sparse_buckets`, one value per position.

    Definition (the dense TAID interpolates logits, which a store does not have; the buckets' log-masses stand in):

        p_t,b = softmax_b((1 - t) * stopgrad(log q_b) + t * log p_b)       b over the K + 1 buckets

    with log q_b the student's bucket log-masses at temperature T and log p_b the stored ones. A bucket that is
    empty (-inf) on either side is empty in p_t for 0 < t < 1 (the limit of the mix); t = 0 is the student's own
    buckets (loss 0), t = 1 the teacher's. Since log q_k = z_s,k / T - lse and log p_k = z_t,k / T - lse_t differ from
    the logits only by per-position constants, which the softmax removes, with K = V this is exactly the dense
    `taid_target`, and the loss `taid_kl`. The gradient w.r.t. the student's bucket logits is q_b - p_t,b.
    """
    log_q, log_p = sparse_buckets(student_logits, target_ids, target_logprobs, tail_logprob,
                                  temperature=temperature, tail=tail)
    return _kl_from_log_probs(sparse_taid_log_target(log_q, log_p, t), log_q)
