"""TAID: temporally adaptive interpolated distillation (Shing et al., "TAID: Temporally Adaptive Interpolated
Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025). Recipe name: ``loss.name: taid``.

The student is trained toward an intermediate distribution that starts near its own and moves to the teacher's:

    p_t = softmax((1 - t) * stopgrad(z_s / T) + t * z_t / T)                  (`functional.taid_target`, fp32)
    L_TAID = sum over loss tokens of KL(p_t || q),   q = softmax(z_s / T)     (`functional.taid_kl`)
    total  = (1 - r) * CE(labels) + r * L_TAID,      r = 1 - loss.ce_weight   (r = 1 by default)

The TAID term runs through `kd.ops.dense_loss` with ``taid_t = t`` (the kernels' TAID target, the same math),
as ``loss.kernel`` says: the fused Triton kernel on CUDA, the chunked PyTorch path elsewhere (bounded fp32 memory);
`functional.taid_kl` is the eager spec both are tested against.

Schedule of t, once per optimizer step s (s = completed steps, 1-based), on that step's loss J:

    step 1:   J_prev = J                                       (t stays t_start)
    later:    delta  = (J_prev - J) / (J_prev + 1e-15)          relative improvement of the loss
              m      = beta * m + (1 - beta) * delta            momentum, m = 0 at the start
              t_lin  = t_start + (t_end - t_start) * s / total_steps
              t      = min(t_end, max(t_lin, t + alpha * sigmoid(m) * (1 - t)))
              J_prev = J
    adaptive: false   t = min(t_end, t_lin) at every step (m stays 0)

A student that is learning fast (J falling, m > 0) is pushed toward the teacher faster; t never falls behind the
linear schedule and never decreases (t + alpha * sigmoid(m) * (1 - t) >= t for t <= 1). Forward at step s uses the t
after s - 1 updates. (Resuming with another train.max_steps changes total_steps, hence t_lin, from then on.)

What this implementation does differently from the paper's reference code, on purpose:

- t moves in `on_step_end`, once per optimizer step after the step, never per micro-batch and never during eval.
- J is the TAID term (``terms["taid"]``, i.e. ``metrics["train/taid"]``) averaged over all loss tokens of all ranks
  by the trainer, so every rank computes the same t from the same number. Why the TAID term and not the total loss:
  the schedule asks "is the student keeping up with the current target p_t?", which is what KL(p_t || q) measures;
  a CE term moves for other reasons (it keeps falling while the KL to a target that just moved rises) and would
  bias the momentum. With the default r = 1 the two are the same number.
- A non-finite J (a diverging step) leaves m and J_prev untouched instead of poisoning m with NaN forever; t still
  follows max(t, t_lin).
- t, m, J_prev and whether the first step happened are plain Python floats kept in ``get_extra_state``, so they land
  in the DeepSpeed module checkpoint and the trainer's client state and resume bit for bit. Keeping t on the host
  also means forward never reads a device scalar (no sync on the hot path).
"""
from __future__ import annotations

import math
from typing import Any

from kd.config.schema import LossConfig
from kd.errors import UserError
from kd.losses.base import (DistillationLoss, FusedLinearInputs, LossContext, LossInputs, LossOutput,
                            fused_linear_mix_with_ce, loss_token_mask, masked_sum, mix_with_ce)
from kd.losses.divergence import (check_sparse_tail, dense_mix_with_ce, fused_linear_sparse_mix_with_ce,
                                  sparse_mix_with_ce)
from kd.losses.functional import taid_kl

# Guard of the relative change against J_prev = 0, as in the paper.
_EPS = 1e-15
# Version of the extra-state layout, checked on load.
_STATE_VERSION = 1


def _sigmoid(x: float) -> float:
    """Logistic function on a host float that cannot overflow: a J_prev near 0 can make m as large as ~1e15."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDLoss(DistillationLoss):
    """``(1 - r) * CE + r * KL(p_t || q)`` per loss token, summed, with t on TAID's adaptive schedule.

    Built by the registry as ``TAIDLoss(cfg, context=...)``: ``cfg`` is the recipe's ``loss`` section (temperature,
    ce_weight and the ``taid`` sub-section: t_start, t_end, alpha, beta, adaptive), ``context.total_steps`` the run's
    number of optimizer steps (the length of the linear schedule). See the module docstring for the math.
    """

    needs_teacher = True
    needs_hidden_states = False
    supports_fused_linear = True
    # A stored top-k teacher too: p_t is then the log-space mix of the K + 1 buckets (functional.sparse_taid_kl).
    teacher_signals = ("dense", "sparse")
    # The metric on_step_end reads J from: the trainer logs term "taid" as "train/taid" (global token mean).
    J_KEY = "train/taid"

    def __init__(self, cfg: LossConfig, *, context: LossContext):
        super().__init__()
        taid = cfg.taid
        if context.total_steps < 1:
            raise UserError(f"TAID needs at least one training step, got total_steps={context.total_steps}",
                            key="train.max_steps")
        self.temperature = float(cfg.temperature)
        self.ce_weight = float(cfg.ce_weight)
        self.t_start, self.t_end = float(taid.t_start), float(taid.t_end)
        self.alpha, self.beta = float(taid.alpha), float(taid.beta)
        self.adaptive = bool(taid.adaptive)
        self.kernel = cfg.kernel  # "auto" | "triton" | "torch": the backend of kd.ops.dense_loss; "eager": taid_kl
        self.sparse_tail = check_sparse_tail(cfg.sparse_tail)  # a stored teacher's tail: bucket | renormalize
        self.total_steps = int(context.total_steps)
        # Schedule state (host floats; see get_extra_state).
        self.t = self.t_start
        self.m = 0.0
        self.j_prev = 0.0
        self.started = False  # whether the first step has stored J_prev

    # ------------------------------------------------------------------ loss
    def forward(self, inputs: LossInputs) -> LossOutput:
        """Sum the mixed per-token loss over this micro-batch's loss tokens at the current t."""
        if inputs.teacher_sparse is not None:
            return sparse_mix_with_ce("taid", inputs, divergence="forward_kl", temperature=self.temperature,
                                      ce_weight=self.ce_weight, kernel=self.kernel, tail=self.sparse_tail,
                                      taid_t=self.t)
        if inputs.teacher_logits is None:
            raise ValueError("taid needs teacher_logits or teacher_sparse (the trainer must run the teacher or read "
                             "its store)")
        # KL(p_t || q) per token; rows outside the mask give 0 and no gradient. t is a host float: no sync.
        if self.kernel == "eager":  # the reference formula (autograd through every op)
            mask = loss_token_mask(inputs.labels)
            per_token = taid_kl(inputs.student_logits, inputs.teacher_logits, self.t, temperature=self.temperature)
            return mix_with_ce("taid", masked_sum(per_token, mask), inputs, mask, self.ce_weight)
        return dense_mix_with_ce("taid", inputs, divergence="forward_kl", temperature=self.temperature,
                                 ce_weight=self.ce_weight, kernel=self.kernel, taid_t=self.t)

    def term_names(self) -> tuple[str, ...]:
        return ("taid", "ce") if self.ce_weight > 0.0 else ("taid",)

    def fused_linear_loss(self, inputs: FusedLinearInputs) -> LossOutput:
        """TAID from hidden states and lm_head weights (`kd.ops.fused_linear_divergence` with ``taid_t``; against a
        stored teacher `kd.ops.fused_linear_sparse`)."""
        if inputs.teacher_sparse is not None:
            return fused_linear_sparse_mix_with_ce("taid", inputs, divergence="forward_kl",
                                                   temperature=self.temperature, ce_weight=self.ce_weight,
                                                   kernel=self.kernel, tail=self.sparse_tail, taid_t=self.t)
        return fused_linear_mix_with_ce("taid", inputs, divergence="forward_kl", temperature=self.temperature,
                                 ce_weight=self.ce_weight, kernel=self.kernel, taid_t=self.t)

    # ------------------------------------------------------------------ schedule
    def t_linear(self, step: int) -> float:
        """The linear schedule t_start -> t_end over the run: t_start + (t_end - t_start) * step / total_steps."""
        return self.t_start + (self.t_end - self.t_start) * step / self.total_steps

    def on_step_end(self, step: int, metrics: dict[str, float]) -> dict[str, float]:
        """Move t once, after optimizer step ``step`` (1-based), from the step's globally averaged TAID term J.

        Returns the state after the update (the t the next step trains with, and the t a checkpoint of this step
        holds) as ``taid/t``, ``taid/m``, plus this step's ``taid/J``.
        """
        if self.J_KEY not in metrics:
            raise KeyError(f"TAIDLoss.on_step_end needs metrics[{self.J_KEY!r}] (the step's TAID term averaged over "
                           f"all loss tokens of all ranks); got keys {sorted(metrics)}")
        j = float(metrics[self.J_KEY])
        if not self.adaptive:
            self.t = min(self.t_end, self.t_linear(step))
        elif not self.started:
            if math.isfinite(j):
                self.j_prev, self.started = j, True
        else:
            if math.isfinite(j):
                delta = (self.j_prev - j) / (self.j_prev + _EPS)
                self.m = self.beta * self.m + (1.0 - self.beta) * delta
                self.j_prev = j
            pushed = self.t + self.alpha * _sigmoid(self.m) * (1.0 - self.t)
            self.t = min(self.t_end, max(self.t_linear(step), pushed))
        return {"taid/t": self.t, "taid/m": self.m, "taid/J": j}

    # ------------------------------------------------------------------ checkpoint state
    def get_extra_state(self) -> dict[str, Any]:
        """Plain Python values (loadable with ``torch.load(weights_only=True)``), restored exactly on resume."""
        return {"version": _STATE_VERSION, "t": self.t, "m": self.m, "j_prev": self.j_prev, "started": self.started}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        expected = {"version", "t", "m", "j_prev", "started"}
        if not isinstance(state, dict) or set(state) != expected or state["version"] != _STATE_VERSION:
            raise ValueError(f"TAID state must be a dict with keys {sorted(expected)} (version {_STATE_VERSION}), "
                             f"got {state!r}")
        self.t, self.m, self.j_prev = float(state["t"]), float(state["m"]), float(state["j_prev"])
        self.started = bool(state["started"])

    def extra_repr(self) -> str:
        return (f"t={self.t}, t_start={self.t_start}, t_end={self.t_end}, alpha={self.alpha}, beta={self.beta}, "
                f"adaptive={self.adaptive}, total_steps={self.total_steps}, temperature={self.temperature}, "
                f"ce_weight={self.ce_weight}, kernel={self.kernel}")
