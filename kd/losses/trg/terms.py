"""The three TRG terms on a sampled node set, as per-node losses (eager PyTorch; the spec and the only path).

Nodes: per sequence b, M of its loss tokens drawn uniformly without replacement (`sample_nodes`); a sequence with
n_b < M loss tokens contributes all of them (m_b = min(M, n_b)), the remaining slots are invalid. Features are the
hidden states at the nodes, L2-normalised: z = x / ||x||, in fp32. Nothing here ever sees more than the node set:
the graphs are N x N over the N = B * M nodes of a micro-batch, the contextual matrices M x M per sequence.

Local graph term (kNN graph on the teacher), for node i with neighbour set K(i) = the k nearest *other* valid nodes
by teacher distance d^t_ij = ||z^t_i - z^t_j||^2:

    A_ij = exp(-d_ij / (2 sigma))                                   edge weights, teacher and student alike
    P_ij = A_ij / sum_{l in K(i)} A_il = softmax_{j in K(i)}(-d_ij / (2 sigma))
    l_local(i) = KL(P^t_i || P^s_i) = sum_{j in K(i)} P^t_ij (log P^t_ij - log P^s_ij)

The row-softmax is taken over the edges in log space (the edge weights normalised over the neighbour set), so sigma
acts as a temperature. A softmax of the weights A themselves would see logits confined to (0, 1] and give nearly
uniform rows whatever sigma is.

Global contrastive term (InfoNCE, the student's node against every teacher node of the micro-batch):

    q_i = g(z^s_i) / ||g(z^s_i)||,   g = Linear(d_student -> d_teacher), trained with the student
    l_global(i) = -log( exp(q_i . z^t_i / tau) / sum_{j valid} exp(q_i . z^t_j / tau) )

Contextual term, per sequence over its m_b nodes, with F = sqrt(d) * z (features at RMS 1, the scale of an attention
query) and d = d_teacher for *both* models, so that the same geometry gives the same matrix; each row is a softmax
over the *other* nodes j != i of the sequence:

    S_ij = softmax_{j != i}(F_i . F_j / sqrt(d)) = softmax_{j != i}(sqrt(d) * z_i . z_j)      (m_b x m_b, S_ii = 0)
    l_context(i) = (1 / (m_b - 1)) * sum_{j != i} (S^t_ij - S^s_ij)^2
    sum_i l_context(i) / m_b = MSE(S^t, S^s) over the m_b (m_b - 1) off-diagonal entries

Two departures from the letter of "softmax(F F^T / sqrt(d))", both measured on SmolLM2-135M's final-norm states (M =
16, d = 576). With the literal L2-normalised F the logits lie in [-1/sqrt(d), 1/sqrt(d)] (~0.04) and every row is
uniform to within 0.3% (MSE ~1e-7): no signal. At RMS 1 the logits are sqrt(d) * cosine, but then the diagonal
(cosine 1, logit 24) outweighs the other tokens (cosine ~0.4) by ~e^14, S is the identity for any model (row entropy
0.18 vs 2.77 uniform) and the MSE of a freshly initialised student equals that of random features. A token's
similarity to itself is 1 in both models and says nothing, so the rows leave it out (row entropy 1.1).

Masking uses finite fills (never -inf) and `torch.where`, so an empty row is uniform rather than NaN and no NaN can
reach the gradient; no function here reads a tensor value on the host.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_NEG = torch.finfo(torch.float32).min  # logit of a masked entry: exp(_NEG - max) == 0, and an all-masked row is uniform


def sample_nodes(mask: Tensor, m: int) -> tuple[Tensor, Tensor, Tensor]:
    """Draw min(M, n_b) loss tokens per sequence, uniformly without replacement, from torch's RNG on mask's device.

    The trainer seeds torch's RNG per rank and saves/restores it in every checkpoint, so the draw is reproducible and
    a resumed run draws exactly what an uninterrupted one would.

    Args:
        mask: [B, L] bool, True at loss tokens.
        m: nodes per sequence (M).
    Returns:
        idx [B, M'] long positions (M' = min(M, L)), valid [B, M'] bool (False past a short sequence's n_b), and
        weight [B, M'] fp32 = n_b / m_b at valid nodes, 0 elsewhere: summing ``weight * per_node_loss`` counts each
        sequence as many times as it has loss tokens, the scale of a per-token sum (see `LossOutput`).
    """
    m = min(m, mask.shape[1])
    scores = torch.rand(mask.shape, device=mask.device)  # in [0, 1): any loss token outranks every -1 below
    idx = scores.masked_fill(~mask, -1.0).topk(m, dim=1).indices
    valid = mask.gather(1, idx)
    n_b = mask.sum(1, keepdim=True)
    m_b = valid.sum(1, keepdim=True).clamp(min=1)
    weight = torch.where(valid, n_b.float() / m_b.float(), torch.zeros((), device=mask.device))
    return idx, valid, weight


def gather_nodes(hidden: Tensor, idx: Tensor) -> Tensor:
    """[B, L, H] hidden states at the node positions idx [B, M] -> [B, M, H] (same dtype)."""
    return hidden.gather(1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def normalize(x: Tensor) -> Tensor:
    """L2-normalise the last dimension in fp32 (a zero vector stays zero instead of becoming NaN)."""
    return F.normalize(x.float(), dim=-1, eps=1e-12)


def _sq_dists(z: Tensor) -> Tensor:
    """Pairwise squared distances of unit rows, [N, N]: ||a - b||^2 = 2 - 2 a.b (clamped at 0 against rounding)."""
    return (2.0 - 2.0 * z @ z.transpose(-1, -2)).clamp(min=0.0)


def local_graph_loss(z_s: Tensor, z_t: Tensor, valid: Tensor, k: int, sigma: float) -> Tensor:
    """Per-node KL between the teacher's and the student's normalised edge weights on the teacher's kNN graph.

    Args:
        z_s: [N, d_s] unit student features, z_t: [N, d_t] unit teacher features (no grad), valid: [N] bool.
        k: neighbours per node; sigma: edge bandwidth.
    Returns:
        [N] fp32, 0 at invalid nodes (and at a node with no valid neighbour).
    """
    n = z_t.shape[0]
    k = min(k, n - 1)
    if k < 1:
        return z_s.new_zeros(n, dtype=torch.float32)  # a single node has no neighbours
    d_t = _sq_dists(z_t)
    usable = valid.unsqueeze(0) & ~torch.eye(n, dtype=torch.bool, device=valid.device)  # [i, j]: j may be i's neighbour
    nbr = d_t.masked_fill(~usable, math.inf).topk(k, dim=1, largest=False).indices  # [N, k]
    ok = usable.gather(1, nbr)  # fewer than k valid others: the extra slots are masked out
    logit_t = (-d_t.gather(1, nbr) / (2.0 * sigma)).masked_fill(~ok, _NEG)
    logit_s = (-_sq_dists(z_s).gather(1, nbr) / (2.0 * sigma)).masked_fill(~ok, _NEG)
    logp_t, logp_s = logit_t.log_softmax(-1), logit_s.log_softmax(-1)
    kl = torch.where(ok, logp_t.exp() * (logp_t - logp_s), torch.zeros((), device=z_s.device)).sum(-1)
    return torch.where(valid, kl, torch.zeros((), device=z_s.device))


def global_contrastive_loss(q: Tensor, z_t: Tensor, valid: Tensor, tau: float) -> Tensor:
    """Per-node InfoNCE: projected student node i against teacher node i, the other valid teacher nodes as negatives.

    Args:
        q: [N, d_t] unit projected student features, z_t: [N, d_t] unit teacher features, valid: [N] bool.
        tau: temperature.
    Returns:
        [N] fp32, 0 at invalid nodes.
    """
    logits = (q @ z_t.transpose(0, 1) / tau).masked_fill(~valid.unsqueeze(0), _NEG)
    nll = -logits.log_softmax(-1).diagonal()
    return torch.where(valid, nll, torch.zeros((), device=q.device))


def contextual_loss(z_s: Tensor, z_t: Tensor, valid: Tensor, scale: float) -> Tensor:
    """Per-node squared error between the rows of the teacher's and the student's in-sequence similarity softmax.

    Args:
        z_s: [B, M, d_s], z_t: [B, M, d_t] unit features; valid: [B, M] bool.
        scale: logit scale sqrt(d) (see the module docstring).
    Returns:
        [B, M] fp32 with l_context(i) = (1 / (m_b - 1)) sum_{j != i} (S^t_ij - S^s_ij)^2, 0 at invalid nodes and
        when the sequence has a single node.
    """
    m = valid.shape[1]
    # [B, M, M]: column j is usable for row i when j is a valid node of the same sequence other than i itself
    cols = valid.unsqueeze(1) & ~torch.eye(m, dtype=torch.bool, device=valid.device)
    s_t = (scale * z_t @ z_t.transpose(1, 2)).masked_fill(~cols, _NEG).softmax(-1)
    s_s = (scale * z_s @ z_s.transpose(1, 2)).masked_fill(~cols, _NEG).softmax(-1)
    sq = torch.where(cols, (s_t - s_s) ** 2, torch.zeros((), device=z_s.device)).sum(-1)
    others = (valid.sum(1, keepdim=True) - 1).clamp(min=1)
    return torch.where(valid, sq / others, torch.zeros((), device=z_s.device))
