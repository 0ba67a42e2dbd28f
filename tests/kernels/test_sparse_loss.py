"""kd.ops.sparse_loss (a stored top-k teacher: loss, CE and gradient in one pass) on every backend against the eager
spec kd.losses.functional.sparse_divergence / sparse_taid_kl, differentiated by autograd.

The Triton backend runs in Triton's interpreter on CPU (TRITON_INTERPRET=1, tests/conftest.py): tiny shapes.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

from kd.losses import functional as F
from kd.ops import sparse_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KNOBS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}
BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
# The interpreter runs every program in Python: the Triton cases of the sweeps below that add little run with -m slow.
SLOW_ON_TRITON = pytest.mark.slow if DEVICE == "cpu" else ()
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def backends(slow_triton=False):
    return [pytest.param(b, marks=SLOW_ON_TRITON) if b == "triton" and slow_triton else b for b in BACKENDS]


def make_store(shape, vocab, k, dtype, seed=0, store_temperature=1.0):
    """Student logits and a top-k store of a random teacher (tail from a logsumexp over the rest, so -inf at k = V);
    ids in random order; every 4th row ignored."""
    gen = torch.Generator().manual_seed(seed)
    s = (torch.randn(*shape, vocab, generator=gen) * 2).to(dtype)
    t = torch.randn(*shape, vocab, generator=gen) * 2
    lp_full = torch.log_softmax(t / store_temperature, -1)
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(s[..., 0].numel())]).view(*shape, k)
    lp = lp_full.gather(-1, ids)
    tail = torch.logsumexp(lp_full.scatter(-1, ids, float("-inf")), -1)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[::4] = -100
    return [x.to(DEVICE) for x in (s, ids, lp, tail, labels)]


def reference(s, ids, lp, tail, labels, name, temperature, ce_weight, knobs, taid_t, tail_mode):
    mask = labels != -100
    if taid_t is None:
        per_row = F.sparse_divergence(s, ids, lp, tail, divergence=name, temperature=temperature, tail=tail_mode,
                                      **knobs)
    else:
        per_row = F.sparse_taid_kl(s, ids, lp, tail, taid_t, temperature=temperature, tail=tail_mode)
    kd = torch.where(mask, per_row, 0.0).sum()
    ce = torch.where(mask, F.cross_entropy(s, labels), 0.0).sum()
    return (1.0 - ce_weight) * kd + ce_weight * ce, kd, ce


def run(backend, name, dtype=torch.float32, shape=None, vocab=131, k=9, temperature=1.7, ce_weight=0.25,
        grad_scale=0.125, grad_output=0.125, taid_t=None, tail="bucket", knobs=None, seed=0, shifted=False,
        chunk_size=None):
    knobs = KNOBS.get(name, {}) if knobs is None else knobs
    shape = shape or ((2, 3) if backend == "triton" and DEVICE == "cpu" else (3, 7))
    s, ids, lp, tail_lp, labels = make_store(shape, vocab, k, dtype, seed)
    if shifted:  # the trainer's view: logits [B, L + 1, V + 5] cut to [:, :-1, :V]
        wide = torch.randn(shape[0], shape[1] + 1, vocab + 5, device=DEVICE).to(dtype)
        wide[:, :-1, :vocab] = s
        leaf_k, leaf_r = wide.clone().requires_grad_(True), wide.clone().requires_grad_(True)
        sk, sr = leaf_k[:, :-1], leaf_r[:, :-1, :vocab]
    else:
        leaf_k, leaf_r = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
        sk, sr = leaf_k, leaf_r
    out = sparse_loss(sk, ids, lp, tail_lp, labels != -100, labels, divergence=name, temperature=temperature,
                      ce_weight=ce_weight, grad_scale=grad_scale, taid_t=taid_t, backend=backend, tail=tail,
                      vocab_size=vocab if shifted else None, chunk_size=chunk_size, **knobs)
    (out.loss * grad_output).backward()
    loss, kd, ce = reference(sr, ids, lp, tail_lp, labels, name, temperature, ce_weight, knobs, taid_t, tail)
    (loss * grad_output).backward()
    torch.testing.assert_close(out.loss, loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.kd_sum, kd, rtol=1e-4, atol=1e-5)
    if ce_weight > 0:
        torch.testing.assert_close(out.ce_sum, ce, rtol=1e-4, atol=1e-5)
    assert int(out.num_tokens) == int((labels != -100).sum())
    assert leaf_k.grad.dtype == dtype
    g, r = leaf_k.grad.float(), leaf_r.grad.float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(g, r, rtol=tol, atol=tol * r.abs().max().item())
    rows = g[:, :-1, :vocab] if shifted else g
    assert torch.all(rows.reshape(-1, vocab)[(labels == -100).reshape(-1)] == 0)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(F.DIVERGENCES))
def test_every_divergence_with_ce(backend, name):
    """[B, L, V] input, odd V, ignored rows, T != 1, CE term, the tail bucket, gradient stored at the scale."""
    run(backend, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_renormalized_top_k(backend):
    run(backend, "jsd", tail="renormalize")


@pytest.mark.parametrize("backend", backends(slow_triton=True))
@pytest.mark.parametrize("name", ["forward_kl", "tvd"])
def test_renormalized_top_k_more(backend, name):
    run(backend, name, tail="renormalize")


@pytest.mark.parametrize("backend", BACKENDS)
def test_taid(backend):
    run(backend, "forward_kl", taid_t=0.4, seed=3)
    run(backend, "forward_kl", taid_t=torch.tensor(0.6), tail="renormalize", seed=4)  # a device-scalar t


@pytest.mark.parametrize("backend", backends(slow_triton=True))
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_taid_ends(backend, tail):
    for t in (0.0, 1.0, torch.tensor(1.0)):
        run(backend, "forward_kl", taid_t=t, tail=tail, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_vocabulary_empty_tail(backend):
    """k = V: the tail is -inf on both sides; nothing becomes NaN (the reverse KLs included). V past one
    interpreter block, so the kernel's unmasked full blocks run too."""
    names = list(F.DIVERGENCES) if backend == "torch" else ["reverse_kl", "jsd"]
    for name in names:
        run(backend, name, vocab=37, k=37, shape=(2, 3))
    if backend == "torch":  # the kernel's full blocks: test_full_and_partial_blocks
        run(backend, "skew_kl", vocab=517, k=517, shape=(1, 2))
    run(backend, "forward_kl", vocab=37, k=37, shape=(2, 3), taid_t=0.5)


@pytest.mark.parametrize("backend", backends(slow_triton=True))
def test_full_vocabulary_every_divergence(backend):
    for name in F.DIVERGENCES:
        run(backend, name, vocab=37, k=37, shape=(2, 3))


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_and_partial_blocks(backend):
    """V = 1100: two full interpreter blocks and a partial one, ids spread over all three."""
    run(backend, "jsd", vocab=1100, k=13, shape=(1, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_output_other_than_the_scale_and_the_shifted_view(backend, dtype):
    run(backend, "forward_kl", dtype=dtype, grad_scale=0.125, grad_output=3.0, shifted=True)
    if dtype == torch.float32:
        run(backend, "skew_reverse_kl", grad_scale=None, grad_output=0.7, ce_weight=0.0, temperature=1.0)


def test_torch_path_blocks_and_k_of_one():
    """Blocks of 2 rows across sequence ends; k = 1 (one stored token, the rest in the tail)."""
    run("torch", "jsd", chunk_size=2)
    run("torch", "reverse_kl", k=1, temperature=1.0)


def test_bad_shapes_and_tail_are_refused():
    s, ids, lp, tail_lp, labels = make_store((2, 3), 17, 4, torch.float32)
    with pytest.raises(ValueError, match="shapes differ"):
        sparse_loss(s, ids[:, :2], lp[:, :2], tail_lp, labels != -100, labels, divergence="tvd")
    with pytest.raises(ValueError, match="tail must be one of"):
        sparse_loss(s, ids, lp, tail_lp, labels != -100, labels, divergence="tvd", tail="drop", backend="torch")


def test_tail_options_agree_with_the_spec():
    from kd.ops.sparse import SPARSE_TAILS
    assert SPARSE_TAILS == F.SPARSE_TAILS


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_store_dtypes(backend):
    """int32 ids and bf16 log-probs (a compact store) give what int64 ids and the fp32 of those values give."""
    s, ids, lp, tail_lp, labels = make_store((2, 3), 67, 6, torch.float32, seed=5)
    lp16, tail16 = lp.bfloat16(), tail_lp.bfloat16()
    outs = []
    for i, l, t in ((ids.int(), lp16, tail16), (ids, lp16.float(), tail16.float())):
        leaf = s.clone().requires_grad_(True)
        out = sparse_loss(leaf, i, l, t, labels != -100, labels, divergence="jsd", backend=backend)
        out.loss.backward()
        outs.append((out.loss, leaf.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_peaked_student_keeps_its_tiny_tail(backend):
    """A student whose k stored ids hold all but ~1e-20 of its mass, against a teacher with 10% in the tail: the
    tail term p_tail log(p_tail / q_tail) ~ 0.1 * 46 dominates; 1 - sum(q_k) would be 0 in fp32 (loss inf). Value and
    gradient against float64 arithmetic written here."""
    vocab, k = 53, 4
    s = torch.full((2, vocab), -25.0, dtype=torch.float64)
    s[:, :k] = torch.tensor([25.0, 24.0, 23.5, 23.0], dtype=torch.float64)
    ids = torch.arange(k).repeat(2, 1)
    lp = torch.log(torch.tensor([0.5, 0.2, 0.1, 0.1], dtype=torch.float64)).repeat(2, 1)
    tail = torch.log(torch.full((2,), 0.1, dtype=torch.float64))
    labels = torch.zeros(2, dtype=torch.long)
    leaf = s.float().to(DEVICE).requires_grad_(True)
    out = sparse_loss(leaf, ids.to(DEVICE), lp.float().to(DEVICE), tail.float().to(DEVICE), labels.to(DEVICE) >= 0,
                      labels.to(DEVICE), divergence="forward_kl", backend=backend)
    out.loss.backward()
    s64 = s.clone().requires_grad_(True)  # float64 buckets: top-k masses, tail = sum over the other entries
    q = torch.softmax(s64, -1)
    q_b = torch.cat([q[:, :k], q[:, k:].sum(-1, keepdim=True)], -1)
    p_b = torch.cat([lp.exp(), tail.exp().unsqueeze(-1)], -1)
    want = (p_b * (p_b.log() - q_b.log())).sum()
    want.backward()
    torch.testing.assert_close(out.loss.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(leaf.grad.double().cpu(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_off_the_mask_with_an_infinite_divergence(backend):
    """A row with a CE label but off the divergence mask, holding the store's filler (k ids, uniform log-probs, tail
    -inf): reverse KL is +inf there (p_tail = 0 < q_tail); it must add nothing and its gradient must be the CE's."""
    s, ids, lp, tail_lp, labels = make_store((1, 4), 41, 5, torch.float32, seed=6)
    labels[0, 0] = 3
    ids[0, 1] = torch.arange(5, device=DEVICE)
    lp[0, 1] = -torch.log(torch.tensor(5.0))
    tail_lp[0, 1] = float("-inf")
    mask = torch.ones_like(labels, dtype=torch.bool)
    mask[0, 1] = False
    leaf = s.clone().requires_grad_(True)
    out = sparse_loss(leaf, ids, lp, tail_lp, mask, labels, divergence="reverse_kl", ce_weight=0.5, backend=backend)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(leaf.grad).all()
    ce_grad = 0.5 * (torch.softmax(s[0, 1], -1) - torch.nn.functional.one_hot(labels[0, 1], 41))
    torch.testing.assert_close(leaf.grad[0, 1], ce_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_stored_token(backend):
    run(backend, "tvd", k=1, shape=(1, 3))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_more_stored_tokens_than_a_block(backend):
    """k = 600 > the interpreter's 512-entry block (some block has every lane stored)."""
    run(backend, "forward_kl", vocab=1100, k=600, shape=(1, 2), ce_weight=0.0)
