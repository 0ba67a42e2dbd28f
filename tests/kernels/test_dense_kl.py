"""Dense Triton kernel vs the eager divergences of kd.losses.functional (the spec).

On a machine without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before triton is
imported); the shapes are small because the interpreter executes every program in Python. The reference is written
here from the functional divergences directly (TAID: the mixed logits built in the test, and functional.taid_kl).
"""
from __future__ import annotations


import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from kd.losses import functional as F  # noqa: E402
from kd.ops import dense_divergence  # noqa: E402
from kd.ops.dense_kl import launch_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter runs numpy over -inf lanes (selected away afterwards); its RuntimeWarnings are noise here.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

KNOBS = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.2}, "skew_reverse_kl": {"alpha": 0.2}}


def reference(student, teacher, mask, name, temperature, knobs, taid_t=None):
    """Per-row loss (0 on ignored rows) from kd.losses.functional, with the TAID mix built here."""
    target = teacher
    if taid_t is not None:
        target = (1.0 - taid_t) * student.detach().float() + taid_t * teacher.float()
    per_row = F.DIVERGENCES[name](student, target, temperature=temperature, **knobs)
    return torch.where(mask, per_row, torch.zeros_like(per_row))


def make(rows, vocab, dtype, seed=0, ignored=(2,)):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(rows, vocab, generator=gen) * 3).to(DEVICE, dtype)
    teacher = (torch.randn(rows, vocab, generator=gen) * 3).to(DEVICE, dtype)
    mask = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    mask[list(ignored)] = False
    grad_out = (torch.rand(rows, generator=gen) + 0.5).to(DEVICE)  # != 1, different per row
    return student, teacher, mask, grad_out


def check(name, dtype, rows, vocab, temperature, taid_t=None, knobs=None, seed=0, tau_tensor=False):
    knobs = KNOBS.get(name, {}) if knobs is None else knobs
    student, teacher, mask, grad_out = make(rows, vocab, dtype, seed)
    s_kernel = student.clone().requires_grad_(True)
    t_arg = torch.tensor(taid_t, device=DEVICE) if (tau_tensor and taid_t is not None) else taid_t
    got = dense_divergence(s_kernel, teacher, mask, divergence=name, temperature=temperature, taid_t=t_arg,
                           backend="triton", **knobs)
    (got * grad_out).sum().backward()
    s_ref = student.clone().requires_grad_(True)
    want = reference(s_ref, teacher, mask, name, temperature, knobs, taid_t)
    (want * grad_out).sum().backward()
    assert got.dtype == torch.float32 and got.shape == (rows,)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    assert s_kernel.grad.dtype == dtype
    g, g_ref = s_kernel.grad.float(), s_ref.grad.float()
    scale = g_ref.abs().max().item()
    # fp32: a wrong formula is off by O(|g|), rounding by ~1e-7 (more where g - c cancels, e.g. tvd).
    # bf16: both sides round the same fp32 gradient once.
    if dtype == torch.float32:
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=max(1e-4 * scale, 1e-6))
    else:
        torch.testing.assert_close(g, g_ref, rtol=1e-2, atol=1e-2 * scale)
    assert torch.all(g[~mask] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_kl_odd_shape(dtype):
    """37 x 1031: vocab not a multiple of the block, ignored rows, grad_output != 1, T != 1."""
    check("forward_kl", dtype, 37, 1031, temperature=1.7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_every_divergence(name, dtype):
    check(name, dtype, 5, 1031, temperature=0.8, seed=1)


@pytest.mark.parametrize("blocks", [1, 2])
@pytest.mark.parametrize("name", ["forward_kl", "jsd"])
def test_vocab_of_whole_blocks(name, blocks):
    """V a multiple of the kernel's block: no partial last block (the other tests have one), in every pass."""
    block = launch_config(torch.device(DEVICE))["BLOCK"]
    check(name, torch.float32, 4, blocks * block, temperature=1.3, seed=7)


@pytest.mark.parametrize("name,tau_tensor", [("forward_kl", False), ("forward_kl", True), ("jsd", False)])
def test_taid_target(name, tau_tensor):
    """TAID: the teacher is replaced by softmax((1 - t) sg(z_s / T) + t z_t / T); t may be a device tensor."""
    check(name, torch.float32, 5, 1031, temperature=1.3, taid_t=0.35, tau_tensor=tau_tensor, seed=2)


def test_taid_matches_functional_taid_kl():
    """With forward_kl, the kernel's TAID loss is the TAID engineer's functional.taid_kl."""
    student, teacher, mask, _ = make(4, 700, torch.float32, seed=3, ignored=())
    got = dense_divergence(student, teacher, mask, divergence="forward_kl", temperature=2.0, taid_t=0.6,
                           backend="triton")
    torch.testing.assert_close(got, F.taid_kl(student, teacher, 0.6, temperature=2.0), rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name,knobs", [("jsd", {"beta": 0.0}), ("jsd", {"beta": 1.0}), ("skew_kl", {"alpha": 0.0}),
                                        ("skew_kl", {"alpha": 1.0}), ("skew_reverse_kl", {"alpha": 1.0})])
def test_degenerate_knobs(name, knobs):
    """The pure ends of beta / alpha give the reference's values (0 or forward KL) and no NaN."""
    check(name, torch.float32, 3, 300, temperature=1.0, knobs=knobs, seed=4)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd", "skew_kl"])
def test_masked_vocabulary_and_garbage_rows(name):
    """Teacher logits of -inf (masked entries) and NaN in an ignored row stay out of the loss and the gradient."""
    student, teacher, mask, grad_out = make(4, 600, torch.float32, seed=5, ignored=(1,))
    teacher[:, 550:] = float("-inf")
    student[1] = float("nan")
    s_kernel = student.clone().requires_grad_(True)
    got = dense_divergence(s_kernel, teacher, mask, divergence=name, backend="triton", **KNOBS.get(name, {}))
    (got * grad_out).sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(s_kernel.grad).all()
    assert got[1] == 0 and torch.all(s_kernel.grad[1] == 0)
    keep = torch.tensor([0, 2, 3], device=DEVICE)
    s_ref = student[keep].clone().requires_grad_(True)
    want = reference(s_ref, teacher[keep], mask[keep], name, 1.0, KNOBS.get(name, {}))
    (want * grad_out[keep]).sum().backward()
    torch.testing.assert_close(got[keep], want, rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(s_kernel.grad[keep], s_ref.grad, rtol=1e-5, atol=1e-7)


def test_shifted_view_vocab_cut():
    """The trainer's input: logits[:, :-1, :V] of [B, L, V'] (a strided view, used without a copy): loss [B, L-1],
    gradient (q - p) / T on the view, zero past V and on the dropped position."""
    student, teacher, mask, _ = make(8, 530, torch.float32, seed=6, ignored=())
    s_full = student.view(2, 4, 530).clone().requires_grad_(True)
    t_full = teacher.view(2, 4, 530)
    got = dense_divergence(s_full[:, :-1], t_full[:, :-1], mask.view(2, 4)[:, 1:], divergence="forward_kl",
                           vocab_size=517, temperature=2.0, backend="triton")
    got.sum().backward()
    assert got.shape == (2, 3)
    q = torch.softmax(student.view(2, 4, 530)[:, :-1, :517] / 2.0, -1)
    p = torch.softmax(teacher.view(2, 4, 530)[:, :-1, :517] / 2.0, -1)
    torch.testing.assert_close(got, (p * (p.log() - q.log())).sum(-1), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(s_full.grad[:, :-1, :517], (q - p) / 2.0, rtol=1e-5, atol=1e-7)
    assert torch.all(s_full.grad[..., 517:] == 0) and torch.all(s_full.grad[:, -1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("beta, end", [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_ends_are_the_kls(beta, end, dtype):
    """jsd at beta = 0 / 1 is forward / reverse KL (TRL's GKD convention), against the KL reference itself."""
    student, teacher, mask, grad_out = make(6, 1031, dtype, seed=8)
    s_kernel, s_ref = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    got = dense_divergence(s_kernel, teacher, mask, divergence="jsd", beta=beta, temperature=1.3, backend="triton")
    want = reference(s_ref, teacher, mask, end, 1.3, {})
    assert want.max() > 0.1
    (got * grad_out).sum().backward()
    (want * grad_out).sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(s_kernel.grad.float(), s_ref.grad.float(), rtol=tol,
                               atol=tol * s_ref.grad.float().abs().max().item())
