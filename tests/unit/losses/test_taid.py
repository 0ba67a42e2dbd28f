"""TAID: the target and loss against formulas written here, the schedule by hand, its invariants, and its state.

Every expected value is computed in this file from the issue's formulas (plain float math or explicit torch ops on
the definitions), never by calling the code under test a second time.
"""
from __future__ import annotations

import importlib.util
import io
import math
import random

import pytest
import torch

from kd.config.schema import LossConfig, TAIDConfig
from kd.errors import UserError
from kd.losses import LossContext, LossInputs, build_loss
from kd.losses.functional import IGNORE_INDEX, taid_kl, taid_target
from kd.losses.taid import TAIDLoss

HAS_TRITON = importlib.util.find_spec("triton") is not None


def _loss(total_steps: int = 100, ce_weight: float = 0.0, temperature: float = 1.0, kernel: str = "auto",
          **taid) -> TAIDLoss:
    cfg = LossConfig(name="taid", ce_weight=ce_weight, temperature=temperature, kernel=kernel, taid=TAIDConfig(**taid))
    loss = build_loss(cfg, LossContext(total_steps=total_steps))
    assert isinstance(loss, TAIDLoss)
    return loss


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


# ---------------------------------------------------------------------------------------------- target and loss
@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_target_is_softmax_of_interpolated_logits(t, temperature):
    zs, zt = _logits(3, 5, 11, seed=1), _logits(3, 5, 11, seed=2)
    mixed = (1 - t) * zs / temperature + t * zt / temperature
    expected = torch.exp(mixed - mixed.max(-1, keepdim=True).values)
    expected = expected / expected.sum(-1, keepdim=True)
    got = taid_target(zs.float(), zt.float(), t, temperature=temperature)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_target_is_fp32_from_bf16_and_never_carries_gradient():
    zs = _logits(4, 9, seed=3).to(torch.bfloat16).requires_grad_(True)
    zt = _logits(4, 9, seed=4).to(torch.bfloat16)
    target = taid_target(zs, zt, 0.5)
    assert target.dtype == torch.float32 and target.grad_fn is None
    torch.testing.assert_close(target.sum(-1), torch.ones(4))


def test_target_ends_allow_masked_teacher_entries():
    zs, zt = _logits(2, 6, seed=5).float(), _logits(2, 6, seed=6).float()
    zt[:, 0] = float("-inf")
    assert torch.isfinite(taid_target(zs, zt, 0.0)).all()  # t = 0: the teacher's -inf must not turn into NaN
    for t in (0.4, 1.0):
        p = taid_target(zs, zt, t)
        assert torch.isfinite(p).all() and (p[:, 0] == 0).all()


def test_kl_value_and_gradient_by_hand():
    t, temperature = 0.6, 2.0
    zs = _logits(5, 13, seed=7).requires_grad_(True)
    zt = _logits(5, 13, seed=8)
    value = taid_kl(zs, zt, t, temperature=temperature)
    p = torch.softmax(((1 - t) * zs.detach() + t * zt) / temperature, -1)
    q = torch.softmax(zs.detach() / temperature, -1)
    torch.testing.assert_close(value.double(), (p * (p.log() - q.log())).sum(-1), rtol=1e-5, atol=1e-6)
    weights = torch.linspace(0.5, 2.0, 5, dtype=torch.float64)  # grad_output != 1
    (value * weights).sum().backward()
    # p_t is a constant: d KL(p_t || q) / d z_s = (q - p_t) / T
    torch.testing.assert_close(zs.grad, weights[:, None] * (q - p) / temperature, rtol=1e-5, atol=1e-6)


def test_kl_is_zero_at_t0():
    zs = _logits(3, 7, seed=9).float().requires_grad_(True)
    value = taid_kl(zs, _logits(3, 7, seed=10).float(), 0.0)
    assert (value == 0).all()
    value.sum().backward()
    assert zs.grad.abs().max() < 1e-6


def test_t_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="t must be in"):
        taid_target(torch.zeros(2, 3), torch.zeros(2, 3), 1.5)


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_loss_sums_over_loss_tokens_and_mixes_ce(ce_weight):
    loss = _loss(ce_weight=ce_weight, temperature=1.5, t_start=0.25)
    zs, zt = _logits(2, 6, 17, seed=11).float(), _logits(2, 6, 17, seed=12).float()
    labels = torch.randint(0, 17, (2, 6), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = IGNORE_INDEX
    labels[1, 5] = IGNORE_INDEX
    zs[0, 0] = float("nan")  # an ignored position must not leak into the sums
    out = loss(LossInputs(zs, zt, labels))
    keep = labels != IGNORE_INDEX
    s, te, y = zs[keep].double(), zt[keep].double(), labels[keep]
    p = torch.softmax((0.75 * s + 0.25 * te) / 1.5, -1)
    log_q = torch.log_softmax(s / 1.5, -1)
    kl = (p * (p.log() - log_q)).sum()
    ce = -torch.log_softmax(s, -1).gather(-1, y[:, None]).sum()  # CE without temperature
    assert int(out.num_tokens) == 9
    torch.testing.assert_close(out.terms["taid"].double(), kl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss_sum.double(), (1 - ce_weight) * kl + ce_weight * ce, rtol=1e-5, atol=1e-5)
    assert ("ce" in out.terms) == (ce_weight > 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed (pip install triton)"))])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates masked -inf lanes in numpy
def test_kernel_paths_agree_with_eager_taid(kernel, dtype):
    """The loss through kd.ops (chunked torch path / Triton kernel) against functional.taid_kl and the hand formula:
    odd vocabulary, ignored rows, temperature != 1, CE mixed in, grad_output != 1."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t, temperature, w = 0.35, 1.7, 0.2
    zs = _logits(2, 5, 37, seed=21).to(device, dtype)
    zt = _logits(2, 5, 37, seed=22).to(device, dtype)
    labels = torch.randint(0, 37, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    labels[0, 1] = labels[1, 4] = IGNORE_INDEX
    loss = _loss(kernel=kernel, ce_weight=w, temperature=temperature, t_start=t).to(device)
    s_kernel = zs.clone().requires_grad_(True)
    out = loss(LossInputs(s_kernel, zt, labels))
    (1.7 * out.loss_sum).backward()

    keep = labels != IGNORE_INDEX
    s_eager = zs.clone().requires_grad_(True)
    eager = torch.where(keep, taid_kl(s_eager, zt, t, temperature=temperature), 0.0).sum()
    ce = torch.nn.functional.cross_entropy(s_eager.float()[keep], labels[keep], reduction="sum")
    (1.7 * ((1 - w) * eager + w * ce)).backward()
    s, te = zs[keep].double(), zt[keep].double()  # by hand, from the (rounded) inputs, in fp64
    p = torch.softmax(((1 - t) * s + t * te) / temperature, -1)
    by_hand = (p * (p.log() - torch.log_softmax(s / temperature, -1))).sum()

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.terms["taid"].double(), by_hand, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.terms["taid"], eager.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s_kernel.grad.float(), s_eager.grad.float(), **tol)
    assert (s_kernel.grad.float()[~keep] == 0).all()


def test_forward_uses_the_state_t():
    loss = _loss(t_start=0.2)
    zs, zt = _logits(1, 4, 9, seed=13).float(), _logits(1, 4, 9, seed=14).float()
    labels = torch.zeros(1, 4, dtype=torch.long)
    loss.t = 0.9
    expected = taid_kl(zs, zt, 0.9).sum()
    torch.testing.assert_close(loss(LossInputs(zs, zt, labels)).loss_sum, expected)


def test_registry_rejects_options_and_needs_teacher_logits():
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(name="taid", options={"t0": 0.1}), LossContext(total_steps=5))
    assert err.value.key == "loss.options"
    with pytest.raises(ValueError, match="teacher_logits"):
        _loss()(LossInputs(torch.zeros(1, 2, 3), None, torch.zeros(1, 2, dtype=torch.long)))


# ---------------------------------------------------------------------------------------------- schedule
def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_one_step_by_hand():
    # t_start 0.4, t_end 1.0, alpha 5e-4, beta 0.99 (the paper's defaults), 10 steps in the run.
    loss = _loss(total_steps=10, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99)
    out1 = loss.on_step_end(1, {"loss": 2.0, "train/taid": 2.0})
    assert out1 == {"taid/t": 0.4, "taid/m": 0.0, "taid/J": 2.0}  # the first step only stores J_prev
    out2 = loss.on_step_end(2, {"loss": 1.5, "train/taid": 1.5})
    m = 0.01 * (2.0 - 1.5) / 2.0  # 0.99 * 0 + 0.01 * delta, delta = 0.25
    t_lin = 0.4 + 0.6 * 2 / 10  # 0.52 beats 0.4 + 5e-4 * sigmoid(m) * 0.6
    assert out2["taid/m"] == pytest.approx(m, rel=1e-12) and out2["taid/t"] == pytest.approx(t_lin, rel=1e-12)
    # A large alpha makes the adaptive term win: t + alpha * sigmoid(m) * (1 - t).
    fast = _loss(total_steps=10, t_start=0.4, t_end=1.0, alpha=0.5, beta=0.9)
    fast.on_step_end(1, {"loss": 4.0, "train/taid": 4.0})
    got = fast.on_step_end(2, {"loss": 3.0, "train/taid": 3.0})
    m = 0.1 * 0.25
    assert got["taid/m"] == pytest.approx(m, rel=1e-12)
    assert got["taid/t"] == pytest.approx(0.4 + 0.5 * _sigmoid(m) * 0.6, rel=1e-12)
    # A third step: momentum carries over, J_prev is the second step's J.
    got = fast.on_step_end(3, {"loss": 3.3, "train/taid": 3.3})
    t2 = 0.4 + 0.5 * _sigmoid(0.025) * 0.6
    m3 = 0.9 * 0.025 + 0.1 * (3.0 - 3.3) / 3.0
    assert got["taid/m"] == pytest.approx(m3, rel=1e-12)
    assert got["taid/t"] == pytest.approx(max(0.4 + 0.6 * 3 / 10, t2 + 0.5 * _sigmoid(m3) * (1 - t2)), rel=1e-12)


def test_schedule_reads_the_taid_term_not_the_total():
    loss = _loss(total_steps=10, alpha=0.5, beta=0.0, ce_weight=0.5)
    loss.on_step_end(1, {"loss": 9.0, "train/taid": 2.0, "train/ce": 16.0})
    got = loss.on_step_end(2, {"loss": 1.0, "train/taid": 1.0, "train/ce": 1.0})
    assert got["taid/J"] == 1.0 and got["taid/m"] == pytest.approx(0.5)  # (2 - 1) / 2, not (9 - 1) / 9
    with pytest.raises(KeyError, match="train/taid"):
        loss.on_step_end(3, {"loss": 1.0})


def _random_run(loss: TAIDLoss, steps: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    ts, j = [], 5.0
    for step in range(1, steps + 1):
        j = max(1e-3, j * rng.uniform(0.7, 1.2))  # losses that fall and rise, also sharply
        ts.append(loss.on_step_end(step, {"loss": j, "train/taid": j})["taid/t"])
    return ts


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [5e-4, 0.05, 0.9])
def test_t_is_monotone_and_within_bounds(seed, alpha):
    loss = _loss(total_steps=200, t_start=0.3, t_end=0.9, alpha=alpha, beta=0.9)
    ts = _random_run(loss, 200, seed)
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    assert all(0.3 <= t <= 0.9 for t in ts)
    assert ts[-1] == 0.9  # the linear floor reaches t_end at the last step
    for step, t in enumerate(ts, start=1):
        if step > 1:
            assert t >= 0.3 + 0.6 * step / 200 - 1e-12  # never behind the linear schedule


def test_non_adaptive_is_the_linear_schedule():
    loss = _loss(total_steps=7, t_start=0.1, t_end=0.8, alpha=0.9, adaptive=False)
    ts = _random_run(loss, 7, seed=0)
    assert ts == [pytest.approx(0.1 + 0.7 * s / 7, rel=1e-12, abs=1e-15) for s in range(1, 8)]
    assert loss.m == 0.0


def test_diverged_step_does_not_poison_the_momentum():
    loss = _loss(total_steps=100, alpha=0.5, beta=0.5)
    loss.on_step_end(1, {"loss": 2.0, "train/taid": 2.0})
    loss.on_step_end(2, {"loss": 1.0, "train/taid": 1.0})
    t, m = loss.t, loss.m
    got = loss.on_step_end(3, {"loss": float("nan"), "train/taid": float("nan")})
    assert got["taid/m"] == m and math.isfinite(got["taid/t"]) and got["taid/t"] >= t
    got = loss.on_step_end(4, {"loss": 0.5, "train/taid": 0.5})
    assert got["taid/m"] == pytest.approx(0.5 * m + 0.5 * (1.0 - 0.5) / 1.0)  # J_prev is still step 2's J


def test_zero_previous_loss_does_not_overflow():
    loss = _loss(total_steps=10, alpha=0.5, beta=0.0)
    loss.on_step_end(1, {"loss": 0.0, "train/taid": 0.0})
    got = loss.on_step_end(2, {"loss": 1.0, "train/taid": 1.0})  # delta = -1e15, sigmoid(m) -> 0
    assert got["taid/m"] == pytest.approx(-1e15) and got["taid/t"] == pytest.approx(0.4 + 0.6 * 2 / 10)


# ---------------------------------------------------------------------------------------------- state
def test_state_dict_round_trip_continues_exactly():
    a = _loss(total_steps=50, alpha=0.3, beta=0.8)
    _random_run(a, 20, seed=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = _loss(total_steps=50, alpha=0.3, beta=0.8)
    b.load_state_dict(torch.load(buf, weights_only=True))  # plain values: loadable without unpickling objects
    assert (b.t, b.m, b.j_prev, b.started) == (a.t, a.m, a.j_prev, a.started)
    for step in range(21, 30):
        metrics = {"loss": 1.0 / step, "train/taid": 1.0 / step}
        assert a.on_step_end(step, metrics) == b.on_step_end(step, metrics)  # bit for bit, not approximately


def test_fresh_loss_state_marks_the_first_step_pending():
    state = _loss().state_dict()["_extra_state"]
    assert state["started"] is False and state["t"] == 0.4 and state["m"] == 0.0


def test_bad_state_is_rejected():
    with pytest.raises(ValueError, match="TAID state"):
        _loss().load_state_dict({"_extra_state": {"t": 0.5}})
