"""The chunked torch path (CPU path, backend="torch") vs full eager formulas: values, gradients, bounded blocks."""
from __future__ import annotations

import pytest
import torch

from kd.losses import chunked
from kd.ops import chunks, torch_path
from kd.losses import functional as F
from kd.ops.spec import DivergenceSpec
from kd.ops import dense_divergence, fused_linear_divergence, resolve_backend

KNOBS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


@pytest.mark.parametrize("name", list(F.DIVERGENCES))
def test_chunked_dense_matches_full_eager(name):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(13, 257, generator=gen) * 2
    teacher = torch.randn(13, 257, generator=gen) * 2
    mask = torch.rand(13, generator=gen) > 0.3
    grad_out = torch.rand(13, generator=gen) + 0.5
    sk = student.clone().requires_grad_(True)
    got = dense_divergence(sk, teacher, mask, divergence=name, temperature=1.5, backend="torch", chunk_size=4,
                           **KNOBS.get(name, {}))
    (got * grad_out).sum().backward()
    sr = student.clone().requires_grad_(True)
    want = torch.where(mask, F.DIVERGENCES[name](sr, teacher, temperature=1.5, **KNOBS.get(name, {})), 0.0)
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sk.grad, sr.grad)


def test_chunked_dense_taid_tensor_t():
    """TAID target, t a tensor: forward KL to p_t = softmax((1 - t) sg(z_s / T) + t z_t / T), gradient (q - p_t) / T."""
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(5, 64, generator=gen)
    teacher = torch.randn(5, 64, generator=gen)
    sk = student.clone().requires_grad_(True)
    got = dense_divergence(sk, teacher, torch.ones(5, dtype=torch.bool), divergence="forward_kl", temperature=2.0,
                           taid_t=torch.tensor(0.3), backend="torch")
    got.sum().backward()
    target = torch.softmax((0.7 * student + 0.3 * teacher) / 2.0, -1)
    q = torch.softmax(student / 2.0, -1)
    want = (target * (target.log() - q.log())).sum(-1)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sk.grad, (q - target) / 2.0)


def _full_reference(h, w, ht, wt, labels, mask, vocab, name, ce_weight, normalizer):
    zs = h @ w[:vocab].t()
    zt = ht @ wt[:vocab].t()
    kd = torch.where(mask, F.DIVERGENCES[name](zs, zt, temperature=0.7, **KNOBS.get(name, {})), 0.0).sum()
    ce = torch.where(labels != -100, F.cross_entropy(zs, labels), 0.0).sum()
    return ((1 - ce_weight) * kd + ce_weight * ce) / normalizer, kd, ce


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "skew_reverse_kl"])
def test_fused_torch_path_matches_full_eager(name, monkeypatch):
    """Value, sums and both gradients; no block of logits has more than chunk_size rows."""
    gen = torch.Generator().manual_seed(2)
    n, hs, ht_dim, vocab = 23, 12, 20, 211
    h = torch.randn(n, hs, generator=gen)
    w = torch.randn(vocab + 5, hs, generator=gen) * 0.5
    ht = torch.randn(n, ht_dim, generator=gen)
    wt = torch.randn(vocab, ht_dim, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::3] = -100
    mask = labels != -100
    normalizer = torch.tensor(float(mask.sum()))
    seen = []

    def spy(logits, teacher, *args):
        seen.append(tuple(logits.shape))
        # 211 logits per row, rows 224 elements apart: every row starts 16-aligned (vectorized kernel loads)
        assert logits.stride() == (224, 1) and teacher.stride() == (224, 1)
        return chunked.eager_chunk_step(logits, teacher, *args)

    hk, wk = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    spec = DivergenceSpec(name, 0.7, **KNOBS.get(name, {}))
    out = chunks.fused_linear_chunks(hk, wk, mask, labels, teacher_hidden=ht, teacher_weight=wt,
                                                teacher_logits=None, spec=spec, ce_weight=0.2, normalizer=normalizer, vocab_size=vocab, chunk_size=5,
                                                step=spy)
    (out.loss * 0.7).backward()
    hr, wr = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, kd, ce = _full_reference(hr, wr, ht, wt, labels, mask, vocab, name, 0.2, normalizer)
    (loss * 0.7).backward()
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.kd_sum, kd)
    torch.testing.assert_close(out.ce_sum, ce)
    torch.testing.assert_close(hk.grad, hr.grad)
    torch.testing.assert_close(wk.grad, wr.grad)
    assert out.num_tokens.item() == mask.sum().item()
    assert seen == [(5, vocab)] * 4 + [(3, vocab)]
    assert torch.all(wk.grad[vocab:] == 0)  # lm_head rows past the vocabulary: exactly zero


def test_fused_shifted_teacher_logits_without_ce():
    """[B, L, H] hidden states and the trainer's shifted teacher logits z[:, :-1] (a strided [B, L, V] view, gathered
    per chunk); no CE term: ce_sum is 0."""
    gen = torch.Generator().manual_seed(3)
    h = torch.randn(2, 4, 8, generator=gen, requires_grad=True)
    w = torch.randn(50, 8, generator=gen, requires_grad=True)
    z_t = torch.randn(2, 5, 50, generator=gen)[:, :-1]
    labels = torch.randint(0, 50, (2, 4), generator=gen)
    out = fused_linear_divergence(h, w, labels >= 0, labels, teacher_logits=z_t, divergence="forward_kl",
                                  backend="torch", chunk_size=3)
    out.loss.backward()
    zs = h.detach() @ w.detach().t()
    torch.testing.assert_close(out.loss, F.forward_kl(zs, z_t).sum())
    torch.testing.assert_close(h.grad, (torch.softmax(zs, -1) - torch.softmax(z_t, -1)) @ w.detach())
    assert out.ce_sum.item() == 0.0


@pytest.mark.parametrize("seq_len,chunk", [(7, 3), (7, 16), (3, 2)])
def test_shifted_teacher_rows_copied_into_aligned_blocks(seq_len, chunk):
    """The trainer's shifted teacher logits z[:, :-1, :V] ([B, L, V''] strided, V not a multiple of 16): each chunk's
    rows, spanning one or more sequences, arrive as the right values in a block whose rows start 16-aligned."""
    gen = torch.Generator().manual_seed(5)
    batch, hidden, width, vocab = 3, 6, 40, 37
    z_full = torch.randn(batch, seq_len + 1, width, generator=gen)
    h = torch.randn(batch, seq_len, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    blocks = []

    def spy(logits, teacher, *args):
        assert logits.stride() == (48, 1) and teacher.stride() == (48, 1), (logits.stride(), teacher.stride())
        blocks.append(teacher.clone())
        return chunked.eager_chunk_step(logits, teacher, *args)

    spec = DivergenceSpec("forward_kl")
    chunks.fused_linear_chunks(h, w, labels >= 0, labels, teacher_hidden=None, teacher_weight=None,
                                          teacher_logits=z_full[:, :-1], spec=spec, vocab_size=vocab,
                                          chunk_size=chunk, step=spy)
    torch.testing.assert_close(torch.cat(blocks), z_full[:, :-1, :vocab].reshape(-1, vocab), rtol=0, atol=0)


def test_no_grad_skips_the_gradient_gemms(monkeypatch):
    """Under torch.no_grad (eval) the loss is the same and no gradient GEMM runs."""
    gen = torch.Generator().manual_seed(4)
    h = torch.randn(6, 8, generator=gen, requires_grad=True)
    w = torch.randn(40, 8, generator=gen, requires_grad=True)
    z_t = torch.randn(6, 40, generator=gen)
    labels = torch.randint(0, 40, (6,), generator=gen)
    with_grad = fused_linear_divergence(h, w, labels >= 0, labels, teacher_logits=z_t, divergence="jsd",
                                        backend="torch").loss

    def forbidden(*args):
        raise AssertionError("gradient GEMM under no_grad")

    monkeypatch.setattr(chunks, "_accumulate_weight_grad", forbidden)
    with torch.no_grad():
        out = fused_linear_divergence(h, w, labels >= 0, labels, teacher_logits=z_t, divergence="jsd",
                                      backend="torch")
    assert out.loss.grad_fn is None
    torch.testing.assert_close(out.loss, with_grad.detach())


def test_bad_arguments():
    h, w = torch.randn(3, 4), torch.randn(10, 4)
    labels, mask = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="teacher_logits or both"):
        fused_linear_divergence(h, w, mask, labels, divergence="forward_kl", backend="torch")
    with pytest.raises(ValueError, match="vocab_size"):
        fused_linear_divergence(h, w, mask, labels, teacher_logits=torch.randn(3, 8), divergence="forward_kl",
                                backend="torch")
    with pytest.raises(ValueError, match="unknown divergence"):
        dense_divergence(torch.randn(3, 5), torch.randn(3, 5), mask, divergence="kl")
    with pytest.raises(ValueError, match="taid_t"):
        dense_divergence(torch.randn(3, 5), torch.randn(3, 5), mask, divergence="forward_kl", taid_t=1.5)
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", torch.zeros(1))
    assert resolve_backend("auto", torch.zeros(1)) == "torch"  # CPU tensors: the torch path


@pytest.mark.parametrize("beta, end", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_ends_resolve_to_the_kls_on_every_path(beta, end):
    """One place turns jsd at beta 0 / 1 into forward / reverse KL: the spec every backend reads its name from."""
    assert DivergenceSpec("jsd", beta=beta).name == end
    assert DivergenceSpec("jsd", beta=0.5).name == "jsd"
    gen = torch.Generator().manual_seed(7)
    student, teacher = torch.randn(9, 131, generator=gen) * 2, torch.randn(9, 131, generator=gen) * 2
    mask = torch.rand(9, generator=gen) > 0.3
    grad_out = torch.rand(9, generator=gen) + 0.5
    sk, sr = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    got = dense_divergence(sk, teacher, mask, divergence="jsd", beta=beta, temperature=1.3, backend="torch")
    want = torch.where(mask, F.DIVERGENCES[end](sr, teacher, temperature=1.3), 0.0)
    assert want.max() > 0.1
    (got * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(sk.grad, sr.grad)
