"""The one trainer, for 1..N ranks on 1..M nodes.

A step: every rank takes its micro-batches from the global sampler, counts the loss tokens of the whole optimizer
step across all ranks (one all-reduce), then for each micro-batch runs the teacher, the student + loss, and backward on
`loss_sum * world / global_tokens`. DeepSpeed averages gradients over ranks and we tell it not to divide by the
accumulation steps, so the gradient is exactly d(sum of all per-token losses)/d(theta) / global_tokens: the mean over
every loss token of the step, never a mean of means, however the batch is split across ranks and micro-batches.
"""
from __future__ import annotations

import math
import os
import time
from typing import Any, Optional

import torch

from kd import checkpoint
from kd.assets import resolve
from kd.config.loader import dump_recipe
from kd.config.schema import Recipe
from kd.data import GlobalSampler, build_datasets, collate, eval_batches, stats_of, take
from kd.engine import dist
from kd.engine.ds_config import student_config, teacher_config
from kd.engine.student import DistillationModule, build_engine, shift
from kd.errors import UserError
from kd.losses import LossContext, build_loss
from kd.losses import functional as F
from kd.metrics import MetricsLogger
from kd.models import load_student, load_teacher
from kd.preflight import check_compatible, load_recipe_tokenizer
from kd.teachers import ModelTeacher


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

        with dist.main_process_first():  # rank 0 tokenizes into the datasets cache, the others read it
            self.train_ds, self.eval_ds = build_datasets(data, self.tokenizer, seed=train.seed, resolve_path=resolve)
        self.global_batch = train.micro_batch_size * train.grad_accum * self.world
        self.total_steps = self._total_steps()
        self.sampler = GlobalSampler(len(self.train_ds), seed=train.seed, shuffle=data.shuffle)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        self.loss = build_loss(recipe.loss, LossContext(
            total_steps=self.total_steps,
            student_hidden_size=student_model.config.hidden_size, teacher_hidden_size=teacher_model.config.hidden_size,
            student_num_layers=student_model.config.num_hidden_layers,
            teacher_num_layers=teacher_model.config.num_hidden_layers,
        ))
        self.engine = build_engine(
            DistillationModule(student_model, self.loss, self.vocab_size), student_ds,
            warmup_steps=train.warmup_steps, total_steps=self.total_steps, min_lr_ratio=train.min_lr_ratio,
        )
        self.teacher = ModelTeacher(teacher_model, teacher_ds, self.device)
        torch.manual_seed(train.seed + 1000 * self.rank)  # dropout etc. differ per rank from here on
        self.step = 0
        self.sample_index = 0  # global sample index: position of the next training sample in the global order

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
        while self.step < self.total_steps:
            scalars = self._train_step()
            self.step += 1
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
        batches = [self._batch(take(self.train_ds, mb)) for mb in ids]
        counts = torch.tensor(
            [sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches), sum(int(b["attention_mask"].sum()) for b in batches)],
            dtype=torch.float64, device=self.device,
        )
        loss_tokens, input_tokens = dist.all_reduce_sum(counts).tolist()
        scale = self.world / max(loss_tokens, 1.0)

        sums: Optional[torch.Tensor] = None
        names: list[str] = []
        t_teacher = t_student = t_optim = 0.0
        for batch in batches:
            t0 = time.perf_counter()
            teacher_out = self.teacher(batch, hidden_states=self.loss.needs_hidden_states) if self.loss.needs_teacher else None
            dist.synchronize()
            t1 = time.perf_counter()
            out = self.engine(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                teacher_logits=teacher_out.logits if teacher_out is not None else None,
                teacher_hidden=teacher_out.hidden_states if teacher_out is not None else None, step=self.step,
            )
            self.engine.backward(out.loss_sum * scale, scale_wrt_gas=False)
            dist.synchronize()
            t2 = time.perf_counter()
            self.engine.step()  # DeepSpeed only updates at the accumulation boundary
            dist.synchronize()
            t_teacher, t_student, t_optim = t_teacher + t1 - t0, t_student + t2 - t1, t_optim + time.perf_counter() - t2
            names = list(out.terms)
            part = torch.stack([out.loss_sum.detach().float()] + [out.terms[k].detach().float() for k in names])
            sums = part if sums is None else sums + part
        totals = (dist.all_reduce_sum(sums.to(torch.float64)) / max(loss_tokens, 1.0)).tolist()

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
        scalars.update(self.loss.on_step_end(self.step + 1, dict(scalars)))
        return scalars

    def _batch(self, samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(samples, self.pad_id).items()}

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics over loss tokens of the whole eval split: student/teacher perplexity, KL(teacher||student)
        at temperature 1, top-1 agreement. Every rank runs the same number of forwards (a ZeRO-3 forward is a
        collective); `eval_batches` pads a short share with a weightless sample."""
        if self.eval_ds is None or len(self.eval_ds) == 0:
            return {}
        student = self.engine.module.student
        student.eval()
        sums = torch.zeros(5, dtype=torch.float64, device=self.device)
        for samples in eval_batches(self.eval_ds, rank=self.rank, world_size=self.world,
                                    micro_batch_size=self.recipe.train.micro_batch_size,
                                    max_batches=self.recipe.eval.max_batches):
            batch = self._batch(samples)
            t_logits = shift(self.teacher(batch).logits, self.vocab_size).float()
            s_logits = shift(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits, self.vocab_size).float()
            labels = batch["labels"][:, 1:]
            mask = labels != -100
            sums += torch.stack([
                (F.cross_entropy(s_logits, labels) * mask).sum(),
                (F.cross_entropy(t_logits, labels) * mask).sum(),
                (F.forward_kl(s_logits, t_logits) * mask).sum(),
                ((s_logits.argmax(-1) == t_logits.argmax(-1)) & mask).sum(),
                mask.sum(),
            ]).to(torch.float64)
        student.train()
        s_nll, t_nll, kl, agree, tokens = _finish(sums)
        scalars = {
            "eval/student_ppl": math.exp(min(s_nll, 50.0)),
            "eval/teacher_ppl": math.exp(min(t_nll, 50.0)),
            "eval/kl": kl,
            "eval/top1_agreement": agree,
            "eval/student_nll": s_nll,
            "eval/tokens": tokens,
        }
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
        }
        tag = checkpoint.save(self.engine, self.ckpt_dir, step=self.step, client_state=client_state,
                              write_meta=self._write_meta, keep_last=self.recipe.checkpoint.keep_last)
        self.metrics.print(f"kd: saved checkpoint {os.path.join(self.ckpt_dir, tag)}")

    def _write_meta(self, meta_dir: str) -> None:
        os.makedirs(meta_dir, exist_ok=True)
        self.engine.module.student.config.save_pretrained(meta_dir)
        self.tokenizer.save_pretrained(meta_dir)
        with open(os.path.join(meta_dir, "recipe.yaml"), "w") as f:
            f.write(dump_recipe(self.recipe))

    def _resume(self) -> int:
        choice = self.recipe.resume
        if choice == "never":
            return 0
        if choice == "auto":
            ckpt_dir, tag = self.ckpt_dir, checkpoint.find_latest(self.ckpt_dir, log=self._log)
            if tag is None:
                return 0
        else:
            path = os.path.abspath(choice)
            ckpt_dir, tag = os.path.dirname(path), os.path.basename(path)
            ok, why = checkpoint.is_complete(path)
            if not ok:
                raise UserError(f"checkpoint {path} cannot be resumed: {why}", key="resume")
        state = checkpoint.load(self.engine, ckpt_dir, tag)
        self.step = int(state["step"])
        self.sample_index = int(state["global_sample_index"])
        if state.get("loss_state"):
            self.loss.load_state_dict(state["loss_state"], strict=False)
        self._log(f"kd: resumed from {os.path.join(ckpt_dir, tag)} at step {self.step}")
        return self.step

    def _write_run_recipe(self) -> None:
        if dist.is_main():
            os.makedirs(self.run_dir, exist_ok=True)
            tmp = os.path.join(self.run_dir, "recipe.yaml.tmp")
            with open(tmp, "w") as f:
                f.write(dump_recipe(self.recipe))
            os.replace(tmp, os.path.join(self.run_dir, "recipe.yaml"))

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


def _finish(sums: torch.Tensor) -> tuple[float, float, float, float, float]:
    total = dist.all_reduce_sum(sums)
    tokens = max(float(total[4]), 1.0)
    s_nll, t_nll, kl, agree = (total[:4] / tokens).tolist()
    return s_nll, t_nll, kl, agree, float(total[4])
