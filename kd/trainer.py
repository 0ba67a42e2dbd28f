"""The one trainer, for 1..N ranks on 1..M nodes.

A step: every rank takes its micro-batches from the global sampler, counts the loss tokens of the whole optimizer
step across all ranks (one all-reduce), then for each micro-batch runs the teacher, the student + loss, and backward on
`loss_sum * world / global_tokens`. DeepSpeed averages gradients over ranks and we tell it not to divide by the
accumulation steps, so the gradient is exactly d(sum of all per-token losses)/d(theta) / global_tokens: the mean over
every loss token of the step, never a mean of means, however the batch is split across ranks and micro-batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import uuid
from typing import Any, ContextManager, Optional

import torch

import kd
from kd import checkpoint, evaluate
from kd.assets import resolve
from kd.config.loader import dump_recipe
from kd.config.schema import Recipe
from kd.data import GlobalSampler, build_datasets, collate, eval_batches, stats_of, take
from kd.engine import dist
from kd.engine import safe_load
from kd.engine.ds_config import merge, student_config, teacher_config
from kd.engine.student import DistillationModule, build_engine, shift
from kd.files import atomic_write
from kd.losses import LossContext, LossOutput, build_loss
from kd.metrics import MetricsLogger
from kd.models import load_student, load_teacher
from kd.preflight import check_compatible, check_student_tokenizer, load_recipe_tokenizer
from kd.resume import plan_resume
from kd.teachers import ModelTeacher, TeacherOutput


class Trainer:
    def __init__(self, recipe: Recipe):
        dist.init()
        self.recipe = recipe
        self.run_dir = recipe.run.output_dir
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.world, self.rank = dist.world_size(), dist.rank()
        self.device = dist.device()
        train, data = recipe.train, recipe.data
        torch.manual_seed(train.seed)  # same init on every rank

        self.tokenizer = load_recipe_tokenizer(recipe)
        teacher_ds = teacher_config(recipe.teacher, micro_batch_size=train.micro_batch_size)
        teacher_model = load_teacher(recipe.teacher, zero3_config=teacher_ds, resolve_path=resolve)
        student_ds = student_config(train, recipe.student, world_size=self.world, extra=recipe.deepspeed)
        student_model = load_student(
            recipe.student, teacher_cfg=recipe.teacher, seed=train.seed,
            zero3_config=student_ds if recipe.student.zero_stage == 3 else None, resolve_path=resolve,
        )
        self.vocab_size = check_compatible(self.tokenizer, teacher_model.config, student_model.config, data.seq_len)
        check_student_tokenizer(recipe, self.tokenizer)

        with dist.main_process_first():  # rank 0 tokenizes into the datasets cache, the others read it
            self.train_ds, self.eval_ds = build_datasets(data, self.tokenizer, seed=train.seed, resolve_path=resolve)
        self.global_batch = train.micro_batch_size * train.grad_accum * self.world
        self.total_steps = self._total_steps()
        self.sampler = GlobalSampler(len(self.train_ds), seed=train.seed, shuffle=data.shuffle)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        # Decide what to resume from before building the engine: a checkpoint from another world size is loaded
        # through DeepSpeed's universal format, which must be switched on in the engine's config.
        self.plan = plan_resume(recipe, self.ckpt_dir, world_size=self.world, log=self._log)
        if self.plan is not None and self.plan.universal:
            student_ds = merge(student_ds, {"checkpoint": {"load_universal": True}})
        # The run's lineage: every checkpoint of this run (and of its resumptions) carries it, and pruning removes
        # only tags of the same lineage, never another run's.
        self.lineage = self.plan.meta.get("lineage") if self.plan is not None else dist.broadcast_object(uuid.uuid4().hex)
        self.loss = build_loss(recipe.loss, LossContext(
            total_steps=self.total_steps,
            student_hidden_size=student_model.config.hidden_size, teacher_hidden_size=teacher_model.config.hidden_size,
            student_num_layers=student_model.config.num_hidden_layers,
            teacher_num_layers=teacher_model.config.num_hidden_layers,
        ))
        self.engine = build_engine(
            DistillationModule(student_model, self.loss, self.vocab_size, fused_linear=recipe.loss.fused_linear), student_ds,
            warmup_steps=train.warmup_steps, total_steps=self.total_steps, min_lr_ratio=train.min_lr_ratio,
        )
        safe_load.install(self.engine)
        if hasattr(self.engine.optimizer, "check_grad_overflow"):
            # ZeRO-1/2 only check fp16/bf16 gradients by default; checking fp32 too makes DeepSpeed skip (not apply)
            # a step whose gradient norm is NaN/inf. ZeRO-3 always checks.
            self.engine.optimizer.check_grad_overflow = True
        self.skip_update = False
        self._guard_unzeroed_optimizer()
        self.teacher = ModelTeacher(teacher_model, teacher_ds, self.device)
        # On the fused-linear path the teacher's head also runs inside the loss kernel (its [B, L, V] logits are never
        # materialized) when its logits are a plain linear head; other teachers hand over their logits.
        self.teacher_head_in_loss = recipe.loss.fused_linear and self.loss.needs_teacher and self.teacher.has_linear_head
        if recipe.loss.fused_linear and self.loss.needs_teacher and not self.teacher_head_in_loss:
            self._log(f"kd: note: teacher {teacher_model.config.model_type!r} has no plain linear head; the fused-linear "
                      "path takes its materialized logits")
        torch.manual_seed(train.seed + 1000 * self.rank)  # dropout etc. differ per rank from here on
        self.step = 0
        self.sample_index = 0  # global sample index: position of the next training sample in the global order
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.term_names: Optional[tuple[str, ...]] = None  # the loss's logged terms, fixed at the first micro-batch
        self.stop_requested = False  # set by SIGTERM/SIGINT (preemption); acted on at the end of the step

    # ------------------------------------------------------------------ the loop
    def train(self) -> None:
        start = self._resume()
        self._write_run_recipe()
        self.metrics = MetricsLogger(
            self.run_dir, enabled=dist.is_main(), total_steps=self.total_steps, start_step=start,
            progress_bar=self.recipe.run.progress_bar, log_interval=self.recipe.run.log_interval,
        )
        if dist.is_main():
            self.metrics.truncate_after(start)  # records of a crashed run past the checkpoint are superseded
        self.metrics.print(
            f"kd: {self.world} rank(s), {len(self.train_ds)} train samples of {self.recipe.data.seq_len} tokens, "
            f"global batch {self.global_batch}, steps {start} -> {self.total_steps}"
        )
        for split, ds in (("train", self.train_ds), ("eval", self.eval_ds)):
            stats = stats_of(ds) if ds is not None else None
            if stats is not None:
                self.metrics.print(f"kd: {split} data: {stats.summary()}")
        ev, ck = self.recipe.eval, self.recipe.checkpoint
        if ev.at_start and start == 0:
            self._evaluate()
        last_saved = start
        self._install_signal_handlers()
        while self.step < self.total_steps:
            scalars = self._train_step()
            self.step += 1
            if self._preempted():
                self.metrics.log_step(self.step, scalars)
                self.metrics.print(f"kd: stop requested (SIGTERM/SIGINT): saving at step {self.step} and exiting")
                self._save()
                self.metrics.close()
                return
            if (ev.interval and self.step % ev.interval == 0) or self.step == self.total_steps:
                self._evaluate()
            self.metrics.log_step(self.step, scalars)
            if ck.interval and self.step % ck.interval == 0:
                self._save()
                last_saved = self.step
        if ck.at_end and last_saved != self.step:
            self._save()
        self.metrics.close()
        dist.barrier()

    def _train_step(self) -> dict[str, float]:
        train = self.recipe.train
        t_step = time.perf_counter()
        ids = self.sampler.step_indices(
            self.sample_index, rank=self.rank, world_size=self.world,
            micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum,
        )
        self.sample_index += self.global_batch
        if self.recipe.run.record_sample_ids:
            self._record_sample_ids(ids)
        return self.step_on([self._batch(take(self.train_ds, mb)) for mb in ids], t_step)

    def step_on(self, batches: list[dict[str, torch.Tensor]], t_step: Optional[float] = None) -> dict[str, float]:
        """One optimizer step on this rank's micro-batches (tools/bench_step.py times exactly this)."""
        t_step = time.perf_counter() if t_step is None else t_step
        counts = torch.tensor(
            [sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)],
            dtype=torch.float64, device=self.device,
        )
        loss_tokens, input_tokens = dist.all_reduce_sum(counts).tolist()
        scale = self.world / max(loss_tokens, 1.0)

        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        t_teacher = t_student = t_optim = 0.0
        finite = True
        for i, batch in enumerate(batches):
            t0 = time.perf_counter()
            teacher_out = self._teacher_forward(batch)
            dist.synchronize()
            t1 = time.perf_counter()
            with self._teacher_head_weight() as teacher_weight:  # gathered (ZeRO-3) only for the loss's forward
                out = LossOutput(**self.engine(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                    teacher_logits=teacher_out.logits, teacher_hidden=teacher_out.hidden_states, step=self.step,
                    teacher_final_hidden=teacher_out.final_hidden, teacher_head_weight=teacher_weight,
                ))
            self.engine.backward(out.loss_sum * scale, scale_wrt_gas=False)
            dist.synchronize()
            t2 = time.perf_counter()
            if self.term_names is None:  # the first micro-batch of the run (a collective: every rank is here)
                self.term_names = self._agree_on_term_names(tuple(out.terms))
            names = self._checked_terms(out.terms)
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
        scalars = {"loss": totals[0], **{f"train/{k}": v for k, v in zip(names, totals[1:])}}
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
        if finite and self.engine.was_step_applied():
            self.nonfinite_in_a_row = 0
            scalars.update(self.loss.on_step_end(self.step + 1, dict(scalars)))  # never fed a non-finite loss
        else:
            self._count_nonfinite(scalars)
        scalars["train/skipped_steps"] = self.nonfinite_total
        return scalars

    def _agree_on_term_names(self, observed: tuple[str, ...]) -> tuple[str, ...]:
        """The loss's logging terms, as the loss declares them (`DistillationLoss.term_names`; a loss that declares
        none is held to the names of its first micro-batch), checked to be the same on every rank. The trainer stacks
        the terms of every micro-batch and all-reduces them as one tensor: a rank with other names would pair its
        numbers with another rank's, or wait in a collective the others never enter."""
        declared = self.loss.term_names()
        names = tuple(declared) if declared is not None else observed
        everyone = dist.all_gather_object(names)
        if any(other != names for other in everyone):
            raise LossContractError(message=f"loss {type(self.loss).__name__} has different term names on different "
                                            f"ranks: {everyone}; term_names() must depend on the recipe only")
        return names

    def _checked_terms(self, terms: dict[str, torch.Tensor]) -> list[str]:
        if tuple(terms) != self.term_names:
            raise LossContractError(local=True, message=(
                f"loss {type(self.loss).__name__} returned terms {list(terms)} at step {self.step + 1}, but its terms "
                f"are {list(self.term_names)} (term_names()); every micro-batch on every rank must return exactly "
                "those, in that order (return a zero sum for a term that has no tokens)"))
        return list(self.term_names)

    def _teacher_forward(self, batch: dict[str, torch.Tensor]) -> TeacherOutput:
        if not self.loss.needs_teacher:
            return TeacherOutput(logits=None)
        return self.teacher(batch, hidden_states=self.loss.needs_hidden_states, layers=self.loss.teacher_hidden_layers,
                            logits=not self.teacher_head_in_loss)

    def _teacher_head_weight(self) -> ContextManager[Optional[torch.Tensor]]:
        return self.teacher.head_weight() if self.teacher_head_in_loss else contextlib.nullcontext()

    def _guard_unzeroed_optimizer(self) -> None:
        """ZeRO optimizers skip a step with a non-finite gradient norm themselves. Without ZeRO, DeepSpeed steps the
        torch optimizer unconditionally, so kd wraps its step: when the step's loss was non-finite it does nothing
        and reports `overflow`, which DeepSpeed already understands (no scheduler step, skipped_steps + 1)."""
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

    def _count_nonfinite(self, scalars: dict[str, float]) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        limit = self.recipe.train.max_nonfinite_steps
        self._log(f"kd: warning: step {self.step + 1} has a non-finite loss ({scalars['loss']}) or gradient norm "
                  f"({scalars.get('grad_norm')}); the update was skipped ({self.nonfinite_in_a_row} in a row, limit {limit})")
        if self.nonfinite_in_a_row >= limit:
            raise TrainingDiverged(
                f"{limit} consecutive steps had a non-finite loss or gradient norm (last: step {self.step + 1}); "
                "stopping without saving. Lower train.lr, check the data, or resume from the last checkpoint "
                f"({checkpoint.read_latest(self.ckpt_dir) or 'none written'})")

    def _batch(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(samples, self.pad_id).items()}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics over loss tokens of the whole eval split: student/teacher perplexity, KL(teacher||student)
        at temperature 1, top-1 agreement (formulas: kd.evaluate, shared with `kd eval`). Every rank runs the same
        number of forwards (a ZeRO-3 forward is a collective); `eval_batches` pads a short share with a weightless
        sample. Sums are all-reduced once, then divided by the global token count."""
        if self.eval_ds is None or len(self.eval_ds) == 0:
            return {}
        student = self.engine.module.student
        student.eval()
        sums = torch.zeros(len(evaluate.SUM_FIELDS), dtype=torch.float64, device=self.device)
        for samples in eval_batches(self.eval_ds, rank=self.rank, world_size=self.world,
                                    micro_batch_size=self.recipe.train.micro_batch_size,
                                    max_batches=self.recipe.eval.max_batches):
            batch = self._batch(samples)
            t_logits = self.teacher(batch).logits
            s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            # logits stay in the model dtype: batch_sums upcasts one bounded block of rows at a time
            sums += evaluate.batch_sums(shift(s_logits, self.vocab_size), shift(t_logits, self.vocab_size),
                                        batch["labels"][:, 1:])
        student.train()
        scalars = evaluate.finish(dist.all_reduce_sum(sums))
        self.metrics.log_eval(self.step, scalars)
        return scalars

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        client_state = {
            "step": self.step,
            "global_sample_index": self.sample_index,
            "world_size": self.world,
            "recipe": dump_recipe(self.recipe),
            "loss_state": {k: v for k, v in self.loss.state_dict().items() if k.endswith("_extra_state")},
            "skipped_steps": self.nonfinite_total,
        }
        tag = checkpoint.save(self.engine, self.ckpt_dir, step=self.step, client_state=client_state,
                              write_meta=self._write_meta, keep_last=self.recipe.checkpoint.keep_last,
                              lineage=self.lineage)
        self.metrics.print(f"kd: saved checkpoint {os.path.join(self.ckpt_dir, tag)}")

    def _write_meta(self, meta_dir: str) -> None:
        os.makedirs(meta_dir, exist_ok=True)
        self.engine.module.student.config.save_pretrained(meta_dir)
        self.tokenizer.save_pretrained(meta_dir)
        with open(os.path.join(meta_dir, "recipe.yaml"), "w") as f:
            f.write(dump_recipe(self.recipe))
        # human-readable facts about the checkpoint; resume reads them before building the engine
        meta = {"step": self.step, "global_sample_index": self.sample_index, "world_size": self.world,
                "student_zero_stage": self.recipe.student.zero_stage, "kd_version": kd.__version__,
                "lineage": self.lineage, "saved_unix": time.time(),
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "recipe": dump_recipe(self.recipe)}
        with open(os.path.join(meta_dir, checkpoint.META_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    def _resume(self) -> int:
        """Restore the planned checkpoint (see kd.resume): weights, optimizer, scheduler, RNG, loss state, and the
        sampler position as a global sample index, so the data order continues without replaying batches."""
        plan = self.plan
        if plan is None:
            self._truncate_sample_ids(0)
            return 0
        state = checkpoint.load(self.engine, plan.ckpt_dir, plan.tag, rng_dir=plan.source_dir)
        self.step = int(state["step"])
        self.sample_index = int(state["global_sample_index"])
        self.nonfinite_total = int(state.get("skipped_steps", 0))
        if state.get("loss_state"):
            self.loss.load_state_dict(state["loss_state"], strict=False)
        self._truncate_sample_ids(self.step)
        self._log(f"kd: resumed from {plan.source_dir} at step {self.step} (global sample index {self.sample_index})")
        return self.step

    # ------------------------------------------------------------------ preemption and audit
    def _install_signal_handlers(self) -> None:
        """SIGTERM (slurm preemption, the deepspeed launcher passing on a kill) and SIGINT (Ctrl-C) only set a flag:
        the current step finishes, every rank agrees at the step end, a checkpoint is saved and the ranks exit 0."""
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _preempted(self) -> bool:
        # A signal may reach only some ranks; one all-reduce of a flag per step makes the decision collective.
        return dist.any_rank(self.stop_requested)

    def _sample_ids_path(self, rank: int) -> str:
        return os.path.join(self.run_dir, "sample_ids", f"rank_{rank:05d}.jsonl")

    def _record_sample_ids(self, ids: list[list[int]]) -> None:
        path = self._sample_ids_path(self.rank)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"step": self.step + 1, "world_size": self.world, "ids": ids}) + "\n")

    def _truncate_sample_ids(self, step: int) -> None:
        """Drop audit records past the resumed step (every rank file, also of ranks that no longer exist)."""
        folder = os.path.join(self.run_dir, "sample_ids")

        def truncate() -> None:
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
                atomic_write(path, "".join(keep))

        if self.recipe.run.record_sample_ids and os.path.isdir(folder):
            dist.run_on_main(truncate)

    def _write_run_recipe(self) -> None:
        def write() -> None:
            os.makedirs(self.run_dir, exist_ok=True)
            atomic_write(os.path.join(self.run_dir, "recipe.yaml"), dump_recipe(self.recipe))

        dist.run_on_main(write)

    def _total_steps(self) -> int:
        train = self.recipe.train
        steps = []
        if train.max_steps is not None:
            steps.append(train.max_steps)
        if train.epochs is not None:
            steps.append(max(1, math.ceil(train.epochs * len(self.train_ds) / self.global_batch)))
        return min(steps)

    def _log(self, message: str) -> None:
        if dist.is_main():
            print(message, flush=True)


def _gradients_finite(optimizer) -> bool:
    """True when every gradient the optimizer would apply is finite (one host sync; ZeRO-0 only, where DeepSpeed does
    not check). A NaN gradient can come with a finite loss, e.g. from an overflow inside backward."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads)
    return bool(torch.isfinite(torch.stack(norms)).all())


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps; the run stops without writing a checkpoint."""


class LossContractError(Exception):
    """A loss broke the lockstep contract (its logged terms differ between micro-batches or ranks): a bug in the loss,
    reported before it could hang a collective or mislabel a curve. ``local``: only this rank saw it."""

    def __init__(self, *, message: str, local: bool = False):
        super().__init__(message)
        self.local = local
