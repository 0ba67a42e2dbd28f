"""No result of kd.ops may depend on what uninitialized memory holds.

Every floating `torch.empty` / `torch.empty_like` is made to return NaN here, so a read of memory nobody wrote shows up every time
instead of once in a few hundred runs. The case that found it: the row-padded [C, V] logit blocks (kd.ops.spec
ROW_ALIGN) handed to CPU bf16 `torch.mm`, which reads the padding columns of a strided input, so whole rows of the
hidden-state gradient came out NaN whenever the allocator returned memory that held a NaN.
"""
from __future__ import annotations

import pytest
import torch

from kd.ops import dense_loss
from tests.kernels import test_fused_linear_kl as fused_dense
from tests.kernels import test_sparse_fused as fused_sparse

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = fused_sparse.BACKENDS
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    def poisoned(real):
        def alloc(*args, **kwargs):
            out = real(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return alloc

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    assert torch.empty(2, 3).isnan().all() and torch.empty_like(torch.ones(2)).isnan().all()  # the poison is in place


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_sparse(backend, dtype):
    fused_sparse.run(backend, "forward_kl", dtype=dtype, chunk_size=None)  # one block of 19 rows
    fused_sparse.run(backend, "forward_kl", dtype=dtype, chunk_size=8)  # three blocks, the last one partial


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")
def test_fused_linear_dense_bf16():
    out, (loss, _, _), got, want, _ = fused_dense.run_both("forward_kl", torch.bfloat16)
    torch.testing.assert_close(out.loss, loss, rtol=3e-2, atol=3e-2)
    fused_dense.assert_grads_close(got, want, torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dense_gradient_through_a_bf16_head(backend):
    """dense_loss's logit gradient (a row-padded buffer on the Triton path) goes back through a bf16 lm_head GEMM."""
    gen = torch.Generator().manual_seed(0)
    vocab = 131  # not a multiple of 16: the gradient buffer's rows are padded
    h = torch.randn(21, 16, generator=gen).to(DEVICE, torch.bfloat16)
    w = (torch.randn(vocab, 16, generator=gen) * 0.5).to(DEVICE, torch.bfloat16)
    teacher = (torch.randn(21, vocab, generator=gen) * 2).to(DEVICE, torch.bfloat16)
    labels = torch.randint(0, vocab, (21,), generator=gen).to(DEVICE)
    grads = []
    for b in (backend, "torch"):
        hk = h.clone().requires_grad_(True)
        out = dense_loss(hk @ w.t(), teacher, labels >= 0, labels, divergence="forward_kl", ce_weight=0.2,
                         backend=b)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        grads.append(hk.grad.float())
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-2 * grads[1].abs().max().item())
