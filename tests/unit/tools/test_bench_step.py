"""tools/bench_step.py: the loss is timed apart from the student, the summary matches hand-computed values, and the
tool recovers a loss's known sleeps end to end on the tiny setup (integration: it starts a process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kd.losses.divergence import DivergenceLoss

from tests.helpers.tools import load_tool

REPO = Path(__file__).resolve().parents[3]


bench = load_tool("bench_step")


class _SleepInBackward(torch.autograd.Function):
    """Identity whose backward sleeps: a phase of known length inside autograd."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        time.sleep(ctx.seconds)
        return grad, None


class _Decoder(torch.nn.Module):
    def __init__(self, fwd_s: float, bwd_s: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))
        self.fwd_s, self.bwd_s = fwd_s, bwd_s

    def forward(self, x):
        time.sleep(self.fwd_s)
        return SimpleNamespace(last_hidden_state=_SleepInBackward.apply(x * self.w, self.bwd_s))


class _Student(torch.nn.Module):
    """A decoder (``student.model``, as HF models name it) and an lm_head, each sleeping a known time each way."""

    base_model_prefix = "model"

    def __init__(self):
        super().__init__()
        self.model = _Decoder(fwd_s=0.05, bwd_s=0.07)
        self.head = torch.nn.Parameter(torch.ones(3))

    def forward(self, x):
        hidden = self.model(x).last_hidden_state
        time.sleep(0.05)
        return SimpleNamespace(logits=_SleepInBackward.apply(hidden * self.head, 0.05))


class _Module(torch.nn.Module):
    """Student + loss, like kd.engine.student.DistillationModule: the loss sleeps a known time each way. On the
    fused-linear path the loss takes the decoder's hidden states (the head is part of the loss)."""

    def __init__(self, loss_fwd_s: float, loss_bwd_s: float, fused: bool = False):
        super().__init__()
        self.student = _Student()
        self.loss_fwd_s, self.loss_bwd_s, self.fused = loss_fwd_s, loss_bwd_s, fused

    def forward(self, x):
        out = self.student.model(x).last_hidden_state if self.fused else self.student(x).logits
        time.sleep(self.loss_fwd_s)
        return {"loss_sum": _SleepInBackward.apply(out, self.loss_bwd_s).sum()}  # as DistillationModule returns


@pytest.mark.parametrize("fused", [False, True])
def test_phase_clock_charges_the_loss_and_not_the_student(fused):
    module = _Module(loss_fwd_s=0.04, loss_bwd_s=0.03, fused=fused)
    synced = []
    clock = bench.PhaseClock(module, module.student, lambda: synced.append(1))
    for _ in range(2):  # two micro-batches accumulate
        module(torch.randn(2, 3))["loss_sum"].backward()
    loss_fwd, loss_bwd = clock.take()
    # 2 x 40 ms of loss forward, 2 x 30 ms of loss backward; the student's decoder and head times must not leak in
    assert 0.08 <= loss_fwd < 0.08 + 0.04
    assert 0.06 <= loss_bwd < 0.06 + 0.04
    assert len(synced) >= 2 * 4  # every mark synchronized the accelerator first
    assert clock.take() == (0.0, 0.0)
    clock.remove()
    module(torch.randn(2, 3))["loss_sum"].backward()
    assert clock.take() == (0.0, 0.0)


def test_phases_are_split_from_the_trainer_scalars():
    scalars = {"perf/teacher_s": 1.0, "perf/student_s": 3.0, "perf/optimizer_s": 0.5, "perf/step_s": 4.75}
    phases = bench.phases_of(scalars, loss_fwd=0.4, loss_bwd=0.6)
    # every phase a different number, so a phase read from the wrong scalar or a swapped pair shows
    assert phases == pytest.approx({"teacher": 1.0, "student_fwd_bwd": 2.0, "loss_fwd": 0.4, "loss_bwd": 0.6,
                                    "optimizer": 0.5, "other": 0.25, "total": 4.75})


def _steps(rows):
    return [dict(zip((*bench.PHASES, "total"), row)) for row in rows]


def test_summary_on_fixed_steps_matches_hand_computed_values():
    #            teacher  student  loss_fwd loss_bwd optimizer other  total
    kd = _steps([(0.5,    1.0,     0.2,     0.1,     0.1,      0.1,   2.0),
                 (5.0,    2.5,     0.4,     0.5,     0.3,      0.3,   9.0),
                 (6.0,    2.0,     0.3,     0.6,     0.3,      0.2,   4.0)])
    base = _steps([(0.5,  0.3,     0.0,     0.0,     0.1,      0.1,   1.0),
                   (1.0,  1.5,     0.0,     0.0,     0.4,      0.1,   3.0),
                   (6.0,  1.5,     0.0,     0.0,     0.4,      0.1,   8.0)])
    result = bench.summarize(kd, base, tokens=120.0)
    # a median per phase, each on its own: the KD step with the median total (the third) has teacher 6.0 and loss
    # backward 0.6, the medians of those phases are 5.0 and 0.5 (the second step's)
    assert result["kd"] == pytest.approx({"teacher": 5.0, "student_fwd_bwd": 2.0, "loss_fwd": 0.3, "loss_bwd": 0.5,
                                          "optimizer": 0.3, "other": 0.2, "total": 4.0})
    assert result["baseline"] == pytest.approx({"teacher": 1.0, "student_fwd_bwd": 1.5, "loss_fwd": 0.0,
                                                "loss_bwd": 0.0, "optimizer": 0.4, "other": 0.1, "total": 3.0})
    assert result["ratio"] == pytest.approx(4.0 / 3.0)
    # pairs in the order they ran: 2/1, 9/3, 4/8 -> median 2 (pairing sorted totals would give 4/3; a mean, 1.83)
    assert result["ratio_of_pairs"] == pytest.approx(2.0)
    assert result["kd_tokens_per_s"] == pytest.approx(30.0)
    assert result["baseline_tokens_per_s"] == pytest.approx(40.0)


class SleepyForwardKL(DivergenceLoss):
    """forward_kl that sleeps 0.3 s in forward and 0.2 s in backward: the bench must put both on the loss."""

    def __init__(self, cfg):
        super().__init__("forward_kl")

    def forward(self, inputs):
        time.sleep(0.3)
        out = super().forward(inputs)
        out.loss_sum = _SleepInBackward.apply(out.loss_sum, 0.2)
        return out


@pytest.mark.integration
def test_bench_runs_on_the_tiny_setup(tmp_path):
    from tests.helpers.tiny_run import make_tiny_run

    recipe = make_tiny_run(tmp_path)
    loss = "tests.unit.tools.test_bench_step.SleepyForwardKL"  # importable from the repo root the tool runs in
    result = subprocess.run(
        [sys.executable, "tools/bench_step.py", str(recipe), f"loss.name={loss}", "--steps", "2", "--warmup", "1",
         "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(r["kd_steps"]) == len(r["baseline_steps"]) == 2
    assert r["tokens_per_step"] == 2 * 2 * 32  # micro-batch x accumulation x packed seq_len
    # the medians reflect the loss's known sleeps: 0.6 s forward, 0.4 s backward per KD step, none in the baseline
    kd, base = r["kd"], r["baseline"]
    assert 0.6 <= kd["loss_fwd"] < 0.6 + 0.4 and 0.4 <= kd["loss_bwd"] < 0.4 + 0.4
    assert base["loss_fwd"] < 0.3 and base["loss_bwd"] < 0.3
    # the KD step holds the 1 s of sleeps on top of what the baseline does, and the rates say so
    assert kd["total"] > base["total"] + 0.8
    assert r["ratio"] > 1 and r["kd_tokens_per_s"] < r["baseline_tokens_per_s"]
    for kd, base in zip(r["kd_steps"], r["baseline_steps"]):
        # 2 micro-batches per step: 0.6 s of loss forward, 0.4 s of loss backward, none of it in the baseline
        assert 0.6 <= kd["loss_fwd"] < 0.6 + 0.4 and 0.4 <= kd["loss_bwd"] < 0.4 + 0.4
        assert base["loss_fwd"] < 0.3 and base["loss_bwd"] < 0.3
        # the 1 s of sleeps is charged to the loss, not to the student (either way: both models do the same work)
        assert abs(kd["student_fwd_bwd"] - base["student_fwd_bwd"]) < 0.5
        assert kd["total"] > 1.0 and kd["total"] > base["total"] + 0.8
        assert kd["teacher"] > 0 and base["teacher"] > 0 and kd["optimizer"] > 0
        # bookkeeping outside the timed phases is small: a phase mislaid into "other" would show here
        assert -0.05 < kd["other"] < 0.3 and -0.05 < base["other"] < 0.3
