"""The sparse-target divergences (a stored top-k teacher + tail bucket) against float64 formulas written here, and
against the dense divergences at K = V."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kd.losses import functional as F

V, K = 23, 5
CASES = [
    ("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
    ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.2}), ("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}),
    ("skew_kl", {"alpha": 0.1}), ("skew_kl", {"alpha": 0.7}), ("skew_kl", {"alpha": 1.0}),
    ("skew_reverse_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.7}),
]


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def make_target(seed: int, shape=(2, 3), vocab=V, k=K, temperature=1.0, top=True):
    """Student logits and a stored teacher built in float64: the teacher's top-k (or k random) ids of softmax(z_t/T),
    their log-probs and log(1 - their sum) (exact enough in float64)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=gen) * 2.5
    t = torch.randn(*shape, vocab, generator=gen) * 2.5
    p = _np_softmax(t.double().numpy() / temperature)
    if top:
        ids = np.argsort(-p, axis=-1)[..., :k]
    else:
        ids = np.stack([np.random.default_rng(seed + i).permutation(vocab)[:k]
                        for i in range(int(np.prod(shape)))]).reshape(*shape, k)
    p_top = np.take_along_axis(p, ids, -1)
    tail = np.log(1.0 - p_top.sum(-1))
    return (s, t, torch.from_numpy(ids).long(), torch.from_numpy(np.log(p_top)).float(),
            torch.from_numpy(tail).float())


def np_buckets(s, ids, lp, tail_lp, temperature, tail):
    """(q, p) over the buckets in float64: the student's full softmax summed per bucket, the teacher as stored."""
    q_full = _np_softmax(s.double().numpy() / temperature)
    idx = ids.numpy()
    q_top = np.take_along_axis(q_full, idx, -1)
    p_top = np.exp(lp.double().numpy())
    if tail == "renormalize":
        return q_top / q_top.sum(-1, keepdims=True), p_top / p_top.sum(-1, keepdims=True)
    q = np.concatenate([q_top, (1.0 - q_top.sum(-1))[..., None]], -1)
    p = np.concatenate([p_top, np.exp(tail_lp.double().numpy())[..., None]], -1)
    return q, p


def np_kl(a, b):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(a > 0, a * np.log(a / b), 0.0).sum(-1)


def np_divergence(name, q, p, beta=0.5, alpha=0.1):
    """The textbook definitions (jsd's ends: the two KLs, as kd.losses.functional.jsd)."""
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return np_kl(p, q)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return np_kl(q, p)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skew_kl":
        return np_kl(p, alpha * p + (1 - alpha) * q)
    return np_kl(q, alpha * q + (1 - alpha) * p)


@pytest.mark.parametrize("tail", F.SPARSE_TAILS)
@pytest.mark.parametrize("name,kw", CASES)
def test_every_divergence_against_float64_buckets(name, kw, tail):
    s, _, ids, lp, tail_lp = make_target(1, temperature=1.3, top=False)
    got = F.sparse_divergence(s, ids, lp, tail_lp, divergence=name, temperature=0.8, tail=tail, **kw)
    want = np_divergence(name, *np_buckets(s, ids, lp, tail_lp, 0.8, tail), **kw)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-5, atol=2e-6)


def test_tail_bucket_is_kept_and_renormalize_drops_it():
    """Forward KL with the tail is the k terms plus p_tail log(p_tail / q_tail); renormalized it is not."""
    s, _, ids, lp, tail_lp = make_target(2)
    q, p = np_buckets(s, ids, lp, tail_lp, 1.0, "bucket")
    bucket = F.sparse_divergence(s, ids, lp, tail_lp, divergence="forward_kl")
    tail_term = p[..., -1] * np.log(p[..., -1] / q[..., -1])
    top_terms = (p[..., :-1] * np.log(p[..., :-1] / q[..., :-1])).sum(-1)
    np.testing.assert_allclose(bucket.double().numpy(), top_terms + tail_term, rtol=2e-5, atol=1e-6)
    renorm = F.sparse_divergence(s, ids, lp, tail_lp, divergence="forward_kl", tail="renormalize")
    assert not np.allclose(renorm.double().numpy(), bucket.double().numpy(), atol=1e-3)


# Reverse-KL-like divergences are +inf where the teacher has p = 0 < q (dense and sparse alike).
INFINITE_ON_MASKED_TEACHER = {("reverse_kl", ()), ("jsd", (("beta", 1.0),))}


def _finite_on_masked_teacher(name, kw):
    return (name, tuple(sorted(kw.items()))) not in INFINITE_ON_MASKED_TEACHER


def _full_vocab_target(seed, temperature, shape=(2, 3), vocab=V, masked_entry=True):
    """K = V: every id stored (in a random order per position), tail -inf."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, vocab, generator=gen) * 2.5
    t = torch.randn(*shape, vocab, generator=gen) * 2.5
    if masked_entry:
        t[..., 3] = float("-inf")  # a masked teacher entry: p = 0 on a stored id
    ids = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(int(np.prod(shape)))]).view(*shape, vocab)
    lp = torch.log_softmax(t / temperature, -1).gather(-1, ids)
    return s, t, ids, lp, torch.full(shape, float("-inf"))


@pytest.mark.parametrize("tail", F.SPARSE_TAILS)
@pytest.mark.parametrize("name,kw", CASES)
def test_full_vocabulary_equals_the_dense_divergence(name, kw, tail):
    """K = V: value and gradient equal the dense `kd.losses.functional` divergence (fp32 rounding)."""
    s, t, ids, lp, tail_lp = _full_vocab_target(3, temperature=1.7, masked_entry=_finite_on_masked_teacher(name, kw))
    s_sparse, s_dense = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = F.sparse_divergence(s_sparse, ids, lp, tail_lp, divergence=name, temperature=1.7, tail=tail, **kw)
    want = F.DIVERGENCES[name](s_dense, t, temperature=1.7, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    weights = torch.linspace(0.5, 2.0, got.numel()).view(got.shape)  # grad_output != 1, different per position
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    assert torch.isfinite(s_sparse.grad).all()
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("t_mix", [0.0, 0.3, 0.75, 1.0])
def test_taid_at_full_vocabulary_equals_dense_taid(t_mix):
    s, t, ids, lp, tail_lp = _full_vocab_target(4, temperature=1.4)
    s_sparse, s_dense = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    got = F.sparse_taid_kl(s_sparse, ids, lp, tail_lp, t_mix, temperature=1.4)
    want = F.taid_kl(s_dense, t, t_mix, temperature=1.4)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(s_sparse.grad, s_dense.grad, rtol=1e-4, atol=1e-6)


def test_taid_target_is_the_log_space_mix_of_the_buckets():
    """p_t = softmax((1 - t) log q_b + t log p_b) in float64; t = 0 gives loss 0, t = 1 the forward KL."""
    s, _, ids, lp, tail_lp = make_target(5, top=False)
    q, p = np_buckets(s, ids, lp, tail_lp, 1.0, "bucket")
    for t_mix in (0.0, 0.4, 1.0):
        target = _np_softmax((1 - t_mix) * np.log(q) + t_mix * np.log(p))
        got = F.sparse_taid_kl(s, ids, lp, tail_lp, t_mix)
        np.testing.assert_allclose(got.double().numpy(), np_kl(target, q), rtol=2e-5, atol=2e-6)
    fkl = F.sparse_divergence(s, ids, lp, tail_lp, divergence="forward_kl")
    torch.testing.assert_close(F.sparse_taid_kl(s, ids, lp, tail_lp, 1.0), fkl, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw", CASES)
def test_gradients_finite_with_empty_tails(name, kw):
    """-inf tails on either side: K = V (both empty) and a teacher whose k tokens hold all its mass (its tail
    empty, the student's not: there the reverse KLs are +inf, as dense); TAID at an interior t on both."""
    finite = _finite_on_masked_teacher(name, kw)
    s, t, ids, lp, tail_lp = _full_vocab_target(6, temperature=1.0, masked_entry=finite)
    s2, _, ids2, lp2, _ = make_target(6)
    lp2 = torch.log_softmax(lp2, -1)  # the k tokens hold everything
    cases = [(s, ids, lp, tail_lp)] + [(s2, ids2, lp2, torch.full(lp2.shape[:-1], float("-inf")))] * finite
    for logits, i, l, tl in cases:
        leaf = logits.clone().requires_grad_(True)
        value = F.sparse_divergence(leaf, i, l, tl, divergence=name, **kw) + F.sparse_taid_kl(leaf, i, l, tl, 0.5)
        assert torch.isfinite(value).all()
        value.sum().backward()
        assert torch.isfinite(leaf.grad).all()


def test_ids_in_any_order():
    s, _, ids, lp, tail_lp = make_target(7, top=False)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0))
    for name, kw in CASES:
        a = F.sparse_divergence(s, ids, lp, tail_lp, divergence=name, **kw)
        b = F.sparse_divergence(s, ids[..., perm], lp[..., perm], tail_lp, divergence=name, **kw)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_student_logits():
    """bf16 logits are upcast before anything else: the value is the fp32 one of the rounded logits; the gradient
    comes back in bf16."""
    s, _, ids, lp, tail_lp = make_target(8)
    s16 = s.bfloat16().requires_grad_(True)
    got = F.sparse_divergence(s16, ids, lp, tail_lp, divergence="jsd", beta=0.3, temperature=2.0)
    want = F.sparse_divergence(s16.detach().float(), ids, lp, tail_lp, divergence="jsd", beta=0.3, temperature=2.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert s16.grad.dtype == torch.bfloat16 and torch.isfinite(s16.grad.float()).all()


def test_stable_student_tail_when_top_k_holds_nearly_all_mass():
    """The student's tail from a logsumexp over the entries it holds: 1 - sum(q_k) would round to 0 in fp32 here."""
    s = torch.full((1, V), -30.0)
    s[0, :K] = 10.0
    ids = torch.arange(K).view(1, K)
    log_q, _ = F.sparse_buckets(s, ids, torch.full((1, K), -2.0), torch.full((1,), -2.0))
    want = np.log((V - K) * np.exp(-40.0) / (K + (V - K) * np.exp(-40.0)))
    np.testing.assert_allclose(log_q[0, -1].item(), want, rtol=1e-6)


def test_bad_tail_option():
    s, _, ids, lp, tail_lp = make_target(9)
    with pytest.raises(ValueError, match="tail must be one of"):
        F.sparse_divergence(s, ids, lp, tail_lp, divergence="tvd", tail="drop")


def test_int32_ids_and_16_bit_stored_logprobs():
    """A compact store's dtypes: int32 ids, bf16 log-probs; the same value as int64 / the fp32 of those values."""
    s, _, ids, lp, tail_lp = make_target(10)
    lp16, tail16 = lp.bfloat16(), tail_lp.bfloat16()
    got = F.sparse_divergence(s, ids.int(), lp16, tail16, divergence="skew_kl", alpha=0.3)
    want = F.sparse_divergence(s, ids, lp16.float(), tail16.float(), divergence="skew_kl", alpha=0.3)
    torch.testing.assert_close(got, want)
