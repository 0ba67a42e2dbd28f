"""The step runner: one trainable engine, its loss and its teacher source, doing one optimizer step on given
micro-batches with the global token normalization. It knows nothing of data order, eval, checkpoints or signals
(the run loop in kd/trainer.py owns those), so the same runner serves classic distillation, a phase of competitive
distillation (one runner per trainable participant) and tools/bench_step.py, which times exactly `step`.

Normalization: the runner counts the loss tokens of the whole optimizer step across all ranks (one all-reduce),
then for each micro-batch runs the teacher, the trained module (student + loss), and backward on
`loss_sum * world / global_tokens`. DeepSpeed averages gradients over ranks and is told not to divide by the
accumulation steps, so the gradient is exactly d(sum of all per-token losses)/d(theta) / global_tokens: the mean over
every loss token of the step, never a mean of means, however the batch is split across ranks and micro-batches. The
token count comes from the batches themselves, so produced batches (generated completions) normalize the same way.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, ContextManager, Iterator, Optional

import torch

from kd.engine import dist
from kd.engine.loss_path import LossPath, decide
from kd.labels import IGNORE_INDEX
from kd.losses import LossOutput
from kd.losses.base import DistillationLoss
from kd.teachers.base import NO_TEACHER, TeacherOutput, TeacherSource


class StepRunner:
    def __init__(self, engine, teacher: TeacherSource, path: LossPath):
        self.engine = engine
        self.module = engine.module  # the DistillationModule: student + loss
        self.teacher = teacher
        self.path = path
        self.world = dist.world_size()
        self.skip_update = False  # the step's loss was non-finite: ZeRO-0's optimizer must not apply it
        self.term_names: Optional[tuple[str, ...]] = None  # the loss's logged terms, fixed at the first micro-batch
        self.histograms: dict[str, tuple[list[float], list[float]]] = {}  # the last step's, from the source's stats
        if hasattr(engine.optimizer, "check_grad_overflow"):
            # ZeRO-1/2 only check fp16/bf16 gradients by default; checking fp32 too makes DeepSpeed skip (not apply)
            # a step whose gradient norm is NaN/inf. ZeRO-3 always checks.
            engine.optimizer.check_grad_overflow = True
        self._guard_unzeroed_optimizer()

    @property
    def loss(self) -> DistillationLoss:
        return self.module.loss

    def step(self, batches: list[dict[str, torch.Tensor]], step: int, t_step: Optional[float] = None) -> dict[str, Any]:
        """One optimizer step (the 1-based `step`) on this rank's micro-batches; returns its scalars. ``applied``
        says whether the update happened (False: the loss or the gradient norm was non-finite and nothing changed)."""
        t_step = time.perf_counter() if t_step is None else t_step
        counts = torch.tensor(
            [sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
             sum(int(b["attention_mask"].sum()) for b in batches)],
            dtype=torch.float64, device=dist.device(),
        )
        loss_tokens, input_tokens = dist.all_reduce_sum(counts).tolist()
        scale = self.world / max(loss_tokens, 1.0)

        sums: Optional[torch.Tensor] = None
        teacher_stats: Optional[torch.Tensor] = None  # a source's own per-step sums (a fusion's weights), if any
        names: list[str] = []
        t_teacher = t_student = t_optim = 0.0
        finite = True
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            teacher_out = self._teacher(batch)
            stats = self._teacher_stats()
            if stats is not None:
                teacher_stats = stats if teacher_stats is None else teacher_stats + stats
            dist.synchronize()
            t1 = time.perf_counter()
            with self._teacher_head_weight() as teacher_weight:  # gathered (ZeRO-3) only for the loss's forward
                out = LossOutput(**self.engine(batch, teacher_out, step, teacher_weight, scale))
            self.engine.backward(out.loss_sum * scale, scale_wrt_gas=False)
            dist.synchronize()
            t2 = time.perf_counter()
            if self.term_names is None:  # the first micro-batch of the run (a collective: every rank is here)
                self.term_names = self._agree_on_term_names(tuple(out.terms))
            names = self._checked_terms(out.terms, step)
            part = torch.stack([out.loss_sum.detach().float()] + [out.terms[k].detach().float() for k in names])
            sums = part if sums is None else sums + part
            if i == len(batches) - 1:
                # The step's global loss is known before the optimizer runs (one all-reduce of a few scalars).
                totals_t = dist.all_reduce_sum(sums.to(torch.float64)) / max(loss_tokens, 1.0)
                finite = bool(torch.isfinite(totals_t[0]))  # the loss itself; terms are for logging only
                self.skip_update = not finite
            self.engine.step()  # DeepSpeed only updates at the accumulation boundary
            dist.synchronize()
            t_teacher, t_student, t_optim = t_teacher + t1 - t0, t_student + t2 - t1, t_optim + time.perf_counter() - t2
        totals = totals_t.tolist()

        step_time = time.perf_counter() - t_step
        scalars: dict[str, Any] = {"loss": totals[0], **{f"train/{k}": v for k, v in zip(names, totals[1:])}}
        if teacher_stats is not None:  # one all-reduce of a few sums, then the source's own means
            stat_names, _ = self.teacher.last_stats_vector()
            from kd.fusion.stats import histograms, summary

            summed = dict(zip(stat_names, dist.all_reduce_sum(teacher_stats).tolist()))
            scalars.update(summary(summed))
            self.histograms = histograms(summed)  # a* per expert, for TensorBoard (the trainer logs them)
        scalars["lr"] = float(self.engine.get_lr()[0])
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            scalars["grad_norm"] = float(grad_norm)
        scalars.update({
            "perf/tokens_per_s": input_tokens / step_time,
            "perf/step_s": step_time,
            "perf/teacher_s": t_teacher,
            "perf/student_s": t_student,
            "perf/optimizer_s": t_optim,
            "train/loss_tokens": loss_tokens,
        })
        # ZeRO skips a step whose gradient norm is NaN/inf (was_step_applied); kd also skips one whose loss is.
        applied = finite and self.engine.was_step_applied()
        if applied:
            scalars.update(self.loss.on_step_end(step, dict(scalars)))  # never fed a non-finite loss
        scalars["applied"] = applied
        return scalars

    @contextlib.contextmanager
    def swap_loss(self, loss: DistillationLoss, *, fused_linear: bool = False) -> Iterator[None]:
        """Run steps with another loss on the same engine (tools/bench_step.py's baseline): the module's loss, the
        loss path and the term contract change together and are restored afterwards."""
        saved = self.module.loss, self.module.fused_linear, self.path, self.term_names
        self.module.loss, self.module.fused_linear = loss, fused_linear
        self.path = decide(loss, fused_linear=fused_linear, teacher=self.teacher.info)
        self.term_names = None
        try:
            yield
        finally:
            self.module.loss, self.module.fused_linear, self.path, self.term_names = saved

    # ------------------------------------------------------------------ parts of a step
    def _teacher(self, batch: dict[str, torch.Tensor]) -> TeacherOutput:
        return self.teacher(batch, self.path.request) if self.path.needs_teacher else NO_TEACHER

    def _teacher_stats(self) -> Optional[torch.Tensor]:
        """The sums a source reports about its last call (`last_stats_vector`, e.g. a fusion's a* per expert)."""
        report = getattr(self.teacher, "last_stats_vector", None)
        if report is None or not self.path.needs_teacher:
            return None
        return report()[1]

    def _teacher_head_weight(self) -> ContextManager[Optional[torch.Tensor]]:
        return self.teacher.head_weight() if self.path.teacher_head_in_loss else contextlib.nullcontext()

    def _agree_on_term_names(self, observed: tuple[str, ...]) -> tuple[str, ...]:
        """The loss's logging terms, as the loss declares them (`DistillationLoss.term_names`; a loss that declares
        none is held to the names of its first micro-batch), checked to be the same on every rank. The runner stacks
        the terms of every micro-batch and all-reduces them as one tensor: a rank with other names would pair its
        numbers with another rank's, or wait in a collective the others never enter."""
        declared = self.loss.term_names()
        names = tuple(declared) if declared is not None else observed
        everyone = dist.all_gather_object(names)
        if any(other != names for other in everyone):
            raise LossContractError(message=f"loss {type(self.loss).__name__} has different term names on different "
                                            f"ranks: {everyone}; term_names() must depend on the recipe only")
        return names

    def _checked_terms(self, terms: dict[str, torch.Tensor], step: int) -> list[str]:
        if tuple(terms) != self.term_names:
            raise LossContractError(local=True, message=(
                f"loss {type(self.loss).__name__} returned terms {list(terms)} at step {step}, but its terms are "
                f"{list(self.term_names)} (term_names()); every micro-batch on every rank must return exactly "
                "those, in that order (return a zero sum for a term that has no tokens)"))
        return list(self.term_names)

    def _guard_unzeroed_optimizer(self) -> None:
        """ZeRO optimizers skip a step with a non-finite gradient norm themselves. Without ZeRO, DeepSpeed steps the
        torch optimizer unconditionally, so kd wraps its step: when the step's loss or any gradient is non-finite it
        does nothing and reports `overflow`, which DeepSpeed already understands (no scheduler step,
        skipped_steps + 1)."""
        optimizer = self.engine.optimizer
        if self.engine.zero_optimization_stage() != 0 or hasattr(optimizer, "overflow"):
            return
        step = optimizer.step

        def guarded_step(*args, **kwargs):
            # The gradients are already all-reduced here, so every rank sees the same ones; the vote keeps the ranks
            # in agreement anyway (one collective per step).
            skip = dist.any_rank(self.skip_update or not _gradients_finite(optimizer))
            optimizer.overflow = skip
            return None if skip else step(*args, **kwargs)

        optimizer.overflow = False
        optimizer.step = guarded_step


def _gradients_finite(optimizer) -> bool:
    """True when every gradient the optimizer would apply is finite (one host sync; ZeRO-0 only, where DeepSpeed does
    not check). A NaN gradient can come with a finite loss, e.g. from an overflow inside backward."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())


class LossContractError(Exception):
    """A loss broke the lockstep contract (its logged terms differ between micro-batches or ranks): a bug in the loss,
    reported before it could hang a collective or mislabel a curve. ``local``: only this rank saw it."""

    def __init__(self, *, message: str, local: bool = False):
        super().__init__(message)
        self.local = local
