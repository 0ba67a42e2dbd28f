"""kd.evaluate metric math against formulas written out here in fp64, and the student resolution of `kd eval`."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kd.errors import UserError
from kd.evaluate import PPL_CAP, SUM_FIELDS, batch_sums, find_student, finish


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


# ------------------------------------------------------------------ --student resolution
def _tag(ckpts, name, *, complete=True):
    tag = ckpts / name
    (tag / "kd_meta").mkdir(parents=True)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if complete:
        (tag / "kd_manifest.json").write_text(json.dumps({"files": {"mp_rank_00_model_states.pt": 1}}))
    return tag


def test_find_student_kinds(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    _tag(ckpts, "step_00000002")
    _tag(ckpts, "step_00000004")
    _tag(ckpts, "step_00000006", complete=False)  # a crashed save: skipped
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")

    assert find_student(None, str(run)).describe() == str(ckpts / "step_00000004")
    assert find_student(str(ckpts), "unused").tag == "step_00000004"
    assert find_student(str(run), "unused").tag == "step_00000004"
    tag = find_student(str(ckpts / "step_00000002"), "unused")
    assert (tag.kind, tag.path, tag.tag) == ("checkpoint", str(ckpts), "step_00000002")
    assert find_student(str(hf), "unused").kind == "hf"


@pytest.mark.parametrize("case", ["missing", "no-checkpoints", "incomplete-tag", "empty-dir"])
def test_find_student_errors(tmp_path, case):
    ckpts = tmp_path / "run" / "checkpoints"
    _tag(ckpts, "step_00000006", complete=False)
    (tmp_path / "empty").mkdir()
    spec, run_dir, words = {
        "missing": (str(tmp_path / "nope"), "x", "does not exist"),
        "no-checkpoints": (None, str(tmp_path / "other"), "no complete checkpoint"),
        "incomplete-tag": (str(ckpts / "step_00000006"), "x", "no manifest"),
        "empty-dir": (str(tmp_path / "empty"), "x", "neither a model directory"),
    }[case]
    with pytest.raises(UserError, match=words) as err:
        find_student(spec, run_dir)
    assert "--student" in str(err.value)
