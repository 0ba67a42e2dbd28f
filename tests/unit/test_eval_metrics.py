"""kd.eval_metrics: the metric math against formulas written out here in fp64, and the shared eval loop."""
from __future__ import annotations

import math

import pytest
import torch

from kd.eval_metrics import PPL_CAP, SUM_FIELDS, batch_sums, evaluate_batches, finish
from kd.labels import IGNORE_INDEX, shift


def _reference(s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The five sums over loss tokens, one token at a time in fp64, from plain log_softmax."""
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    out = torch.zeros(5, dtype=torch.float64)
    for i, label in enumerate(y.reshape(-1).tolist()):
        if label == -100:
            continue
        log_q, log_p = torch.log_softmax(s[i], -1), torch.log_softmax(t[i], -1)
        p = log_p.exp()
        kl = sum(p[v] * (log_p[v] - log_q[v]) for v in range(len(p)) if p[v] > 0)  # 0 log 0 = 0
        out += torch.tensor([-log_q[label], -log_p[label], kl,
                             float(s[i].argmax() == t[i].argmax()), 1.0], dtype=torch.float64)
    return out


def _batch(b=3, length=7, v=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, length, v, generator=g) * scale
    t = torch.randn(b, length, v, generator=g) * scale
    t[0, :3] = s[0, :3] * 1.5  # some rows agree on top-1 for sure
    y = torch.randint(0, v, (b, length), generator=g)
    y[0, 0] = -100  # ignored positions: a prompt token, padding
    y[1:, -2:] = -100
    return s, t, y


def test_sums_match_independent_formula():
    s, t, y = _batch()
    got = batch_sums(s, t, y)
    assert got.dtype == torch.float64 and got.shape == (len(SUM_FIELDS),)
    torch.testing.assert_close(got, _reference(s, t, y), rtol=1e-5, atol=1e-5)
    assert got[4] == (y != -100).sum()
    assert 0 < got[3] < got[4]


@pytest.mark.parametrize("block_elements", [1, 11, 33, 77, 5 * 11 * 7, 1 << 20])
def test_chunking_does_not_change_the_sums(block_elements):
    # rows per block: 1, 1, 3 (positions of one sequence), 7 (one sequence), 5 sequences at once, everything
    s, t, y = _batch(b=5, length=7, v=11, seed=1)
    full = batch_sums(s, t, y, block_elements=1 << 30)
    torch.testing.assert_close(batch_sums(s, t, y, block_elements=block_elements), full, rtol=1e-12, atol=1e-9)


def test_shifted_views_flat_rows_and_bf16():
    s, t, y = _batch(b=2, length=9, v=13, seed=2)
    # the trainer's shift: a non-contiguous view of [B, L, V]; labels shifted the other way
    s_view, t_view, y_shift = s[:, :-1], t[:, :-1], y[:, 1:]
    expected = _reference(s_view, t_view, y_shift)
    torch.testing.assert_close(batch_sums(s_view, t_view, y_shift, block_elements=20), expected, rtol=1e-5, atol=1e-5)
    flat = batch_sums(s_view.reshape(-1, 13), t_view.reshape(-1, 13), y_shift.reshape(-1), block_elements=40)
    torch.testing.assert_close(flat, expected, rtol=1e-5, atol=1e-5)
    # bf16 logits: the same numbers as their exact fp32 upcast (computed in fp32, not in bf16)
    sb, tb = s.bfloat16(), t.bfloat16()
    torch.testing.assert_close(batch_sums(sb, tb, y), _reference(sb.float(), tb.float(), y), rtol=1e-5, atol=1e-5)


def test_ignored_positions_cannot_leak_nan():
    s, t, y = _batch(seed=3)
    clean = batch_sums(s, t, y)
    s2, t2 = s.clone(), t.clone()
    s2[1, -1] = float("nan")  # ignored positions
    t2[2, -2] = float("inf")
    torch.testing.assert_close(batch_sums(s2, t2, y), clean, rtol=0, atol=0)


def test_masked_teacher_vocabulary_entries():
    s, t, y = _batch(seed=4)
    t[..., -2:] = float("-inf")  # teacher gives no mass to two entries: KL stays finite, 0 * log 0 = 0
    y = torch.where(y >= 9, torch.zeros_like(y), y)  # labels the teacher can predict
    got = batch_sums(s, t, y)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, _reference(s, t, y), rtol=1e-5, atol=1e-5)


def test_finish_divides_once_over_all_batches():
    # two batches with very different token counts: the result is the per-token mean of both, not a mean of means
    a = _batch(b=1, length=3, v=11, seed=5)
    b = _batch(b=4, length=9, v=11, seed=6)
    out = finish(batch_sums(*a) + batch_sums(*b))
    s = torch.cat([a[0].reshape(-1, 11), b[0].reshape(-1, 11)])
    t = torch.cat([a[1].reshape(-1, 11), b[1].reshape(-1, 11)])
    y = torch.cat([a[2].reshape(-1), b[2].reshape(-1)])
    keep = y != -100
    log_q, log_p = torch.log_softmax(s[keep].double(), -1), torch.log_softmax(t[keep].double(), -1)
    nll_s = -log_q.gather(1, y[keep, None]).mean().item()
    nll_t = -log_p.gather(1, y[keep, None]).mean().item()
    assert set(out) == {"eval/student_ppl", "eval/teacher_ppl", "eval/kl", "eval/top1_agreement",
                        "eval/student_nll", "eval/tokens"}
    assert out["eval/tokens"] == int(keep.sum())
    assert out["eval/student_nll"] == pytest.approx(nll_s, rel=1e-6)
    assert out["eval/student_ppl"] == pytest.approx(math.exp(nll_s), rel=1e-6)
    assert out["eval/teacher_ppl"] == pytest.approx(math.exp(nll_t), rel=1e-6)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert out["eval/kl"] == pytest.approx(kl, rel=1e-6)
    agree = (s[keep].argmax(-1) == t[keep].argmax(-1)).double().mean().item()
    assert out["eval/top1_agreement"] == pytest.approx(agree)


def test_finish_caps_perplexity_and_handles_no_tokens():
    out = finish(torch.tensor([120.0, 2.0, 1.0, 1.0, 2.0], dtype=torch.float64))
    assert out["eval/student_nll"] == 60.0 and out["eval/student_ppl"] == math.exp(PPL_CAP)
    assert out["eval/teacher_ppl"] == pytest.approx(math.e)
    empty = finish(torch.zeros(5, dtype=torch.float64))
    assert empty["eval/tokens"] == 0 and empty["eval/student_ppl"] == 1.0 and empty["eval/kl"] == 0.0


def test_shape_mismatch_is_a_bug_not_silent():
    s, t, y = _batch()
    with pytest.raises(ValueError):
        batch_sums(s, t[:, :-1], y)


def _model_batch(b, length, v, seed):
    """A batch as collate makes it (unshifted labels, -100 on padding) and unshifted logits for it with a padded
    vocabulary (v + 3 rows, as an lm_head rounded up past the tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, v, (b, length), generator=g)
    labels[0, :2] = -100
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones(b, length, dtype=torch.long),
             "labels": labels}
    s = torch.randn(b, length, v + 3, generator=g) * 3
    t = torch.randn(b, length, v + 3, generator=g) * 3
    return batch, s, t


def test_evaluate_batches_equals_batch_sums_of_the_concatenation():
    # two batches of different lengths; the independent check: shift by hand, pad to one length with ignored
    # labels, concatenate, one batch_sums call
    v = 11
    (b1, s1, t1), (b2, s2, t2) = _model_batch(2, 7, v, seed=7), _model_batch(3, 5, v, seed=8)
    logits = {id(b1): (s1, t1), id(b2): (s2, t2)}
    calls = []

    def student(batch):
        calls.append("student")
        return logits[id(batch)][0]

    def teacher(batch):
        calls.append("teacher")
        return logits[id(batch)][1]

    got = evaluate_batches(iter([b1, b2]), student=student, teacher=teacher, vocab_size=v)
    assert calls == ["student", "teacher"] * 2

    def flat(s, t, batch):
        return (s[:, :-1, :v].reshape(-1, v), t[:, :-1, :v].reshape(-1, v), batch["labels"][:, 1:].reshape(-1))

    parts = [flat(s1, t1, b1), flat(s2, t2, b2)]
    expected = batch_sums(*(torch.cat([p[i] for p in parts]) for i in range(3)))
    assert got.dtype == torch.float64 and got.shape == (len(SUM_FIELDS),)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(got, _reference(*parts[0]) + _reference(*parts[1]), rtol=1e-5, atol=1e-5)

    # `sums` is added to, not replaced; no batch returns it unchanged
    start = torch.arange(5, dtype=torch.float64)
    again = evaluate_batches([b1, b2], student=student, teacher=teacher, vocab_size=v, sums=start.clone())
    torch.testing.assert_close(again, expected + start, rtol=1e-12, atol=1e-9)
    assert torch.equal(evaluate_batches([], student=student, teacher=teacher, vocab_size=v, sums=start), start)


def test_evaluate_batches_runs_without_grad():
    batch, s, t = _model_batch(1, 4, 5, seed=9)
    weight = torch.ones((), requires_grad=True)
    seen = []

    def student(b):
        out = s * weight
        seen.append(out.requires_grad)
        return out

    out = evaluate_batches([batch], student=student, teacher=lambda b: t, vocab_size=5)
    assert seen == [False] and not out.requires_grad


def test_labels_conventions():
    assert IGNORE_INDEX == -100  # torch's cross_entropy default: labels feed torch's and HF's losses unchanged
    x = torch.arange(2 * 4 * 6).reshape(2, 4, 6)
    assert torch.equal(shift(x), x[:, :3])
    assert torch.equal(shift(x, 5), x[:, :3, :5])
    assert shift(x, 5).data_ptr() == x.data_ptr()  # a view
    assert shift(None, 5) is None
