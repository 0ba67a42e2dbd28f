"""The run loop, for 1..N ranks on 1..M nodes: data, eval, checkpoints, signals and resume around a step runner.

Classic distillation is one phase ("distill") of one trainable participant, the student: every optimizer step the
producer hands this rank its micro-batches and the step runner (kd/engine/step.py: the engine, its loss and the
teacher source, with the global token normalization) takes one optimizer step on them. The run loop decides what
happens between steps. A method with several phases or two trainable participants (competitive distillation) builds
one runner per participant and loops over phases; the checkpoint's client state names the phase and the participant
so a resume lands where the run was.

Shape of a run:
    teacher source   kd.teachers.build_teacher_source(recipe)   what the teacher says about a batch
    participant      kd.engine.participant.Participant           a trainable model: role, engine, checkpoint dir
    loss path        kd.engine.loss_path.decide                  logits or fused-linear, and the teacher request
    step runner      kd.engine.step.StepRunner                   one optimizer step on given micro-batches
    producer         kd.data.SampledBatches                      a step's micro-batches (resumable position)
"""
from __future__ import annotations

import json
import math
import os
import signal
import time
import uuid
from typing import Any

import torch

import kd
from kd import checkpoint
from kd.assets import resolve
from kd.config.loader import dump_recipe
from kd.config.schema import Recipe
from kd.data import SampledBatches, build_datasets, eval_batches, stats_of
from kd.engine import dist, loss_path
from kd.engine import safe_load
from kd.engine.ds_config import merge, student_config
from kd.engine.participant import Participant
from kd.engine.step import LossContractError, StepRunner  # noqa: F401 - LossContractError is re-exported for kd.launch
from kd.engine.student import DistillationModule, build_engine
from kd.errors import UserError
from kd.eval_metrics import SUM_FIELDS, evaluate_batches, finish
from kd.files import atomic_write
from kd.losses import LossContext, build_loss
from kd.metrics import MetricsLogger
from kd.models import load_student
from kd.preflight import check_compatible, check_student_tokenizer, load_recipe_tokenizer
from kd.resume import plan_resume
from kd.teachers import build_teacher_source
from kd.teachers.base import TeacherRequest

PHASE = "distill"  # the one phase of classic distillation, named in every checkpoint's client state


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
        with dist.main_process_first():  # rank 0 tokenizes into the datasets cache, the others read it
            self.train_ds, self.eval_ds = build_datasets(data, self.tokenizer, seed=train.seed, resolve_path=resolve)
        # (a teacher store is checked against and addressed by the tokenized samples, hence the data comes first)
        self.teacher = build_teacher_source(recipe, device=self.device, resolve_path=resolve, tokenizer=self.tokenizer,
                                            splits={"train": self.train_ds, "eval": self.eval_ds})
        teacher = self.teacher.info
        student_ds = student_config(train, recipe.student, world_size=self.world, extra=recipe.deepspeed)
        student_model = load_student(
            recipe.student, teacher_cfg=recipe.teacher, seed=train.seed,
            zero3_config=student_ds if recipe.student.zero_stage == 3 else None, resolve_path=resolve,
        )
        self.vocab_size = check_compatible(self.tokenizer, teacher.config, student_model.config, data.seq_len)
        check_student_tokenizer(recipe, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.producer = SampledBatches(
            self.train_ds, seed=train.seed, shuffle=data.shuffle, rank=self.rank, world_size=self.world,
            micro_batch_size=train.micro_batch_size, grad_accum=train.grad_accum, pad_id=self.pad_id,
            device=self.device)
        self.global_batch = self.producer.global_batch
        self.total_steps = self._total_steps()

        # Decide what to resume from before building the engine: a checkpoint from another world size is loaded
        # through DeepSpeed's universal format, which must be switched on in the engine's config.
        self.plan = plan_resume(recipe, self.ckpt_dir, world_size=self.world, log=self._log)
        if self.plan is not None and self.plan.universal:
            student_ds = merge(student_ds, {"checkpoint": {"load_universal": True}})
        # The run's lineage: every checkpoint of this run (and of its resumptions) carries it, and pruning removes
        # only tags of the same lineage, never another run's.
        self.lineage = self.plan.meta.get("lineage") if self.plan is not None else dist.broadcast_object(uuid.uuid4().hex)
        loss = build_loss(recipe.loss, LossContext(
            total_steps=self.total_steps,
            student_hidden_size=student_model.config.hidden_size, teacher_hidden_size=teacher.hidden_size,
            student_num_layers=student_model.config.num_hidden_layers, teacher_num_layers=teacher.num_layers,
        ))
        path = loss_path.decide(loss, fused_linear=recipe.loss.fused_linear, teacher=teacher)
        if path.fused_linear and path.needs_teacher and not path.teacher_head_in_loss:
            self._log(f"kd: note: teacher {teacher.name!r} has no plain linear head; the fused-linear path takes its "
                      "materialized logits")
        engine = build_engine(
            DistillationModule(student_model, loss, self.vocab_size, fused_linear=path.fused_linear), student_ds,
            warmup_steps=train.warmup_steps, total_steps=self.total_steps, min_lr_ratio=train.min_lr_ratio,
        )
        safe_load.install(engine)
        self.student = Participant(role="student", engine=engine, ckpt_dir=self.ckpt_dir)
        self.runner = StepRunner(engine, self.teacher, path)
        if recipe.on_policy is not None:  # some steps' batches are generated on the engines instead of sampled
            self.producer = self._on_policy_producer(engine)
        torch.manual_seed(train.seed + 1000 * self.rank)  # dropout etc. differ per rank from here on
        self.step = 0  # optimizer steps completed
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.stop_requested = False  # set by SIGTERM/SIGINT (preemption); acted on at the end of the step

    @property
    def loss(self):
        return self.runner.loss

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
        try:
            self._run_steps(start)
        finally:  # a failed run's last TensorBoard events and lines reach the disk too (ranks end with os._exit)
            self.metrics.close()

    def _run_steps(self, start: int) -> None:
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

    def _on_policy_producer(self, engine):
        from kd.generation.engines import student_target, teacher_target
        from kd.generation.on_policy import OnPolicyBatches

        cfg = self.recipe.on_policy
        if self.tokenizer.eos_token_id is None or self.pad_id is None:
            raise UserError("on-policy generation needs a tokenizer with an EOS token (it ends completions and is a "
                            "loss token); this one has none", key="tokenizer" if self.recipe.tokenizer else "teacher.path")
        if cfg.source == "teacher" and not hasattr(self.teacher, "engine"):
            raise UserError(f"the teacher {self.teacher.info.name!r} cannot write completions (only a single model "
                            "can); use on_policy.source: student", key="on_policy.source")
        target = student_target(engine) if cfg.source == "student" else teacher_target(self.teacher)
        return OnPolicyBatches(self.producer, cfg, target=target, seed=self.recipe.train.seed,
                               seq_len=self.recipe.data.seq_len, eos_id=self.tokenizer.eos_token_id,
                               pad_id=self.pad_id, vocab_size=self.vocab_size, decode=self.tokenizer.decode)

    def _train_step(self) -> dict[str, float]:
        t_step = time.perf_counter()
        batches, ids = self.producer.next_step(self.step + 1)
        if self.recipe.run.record_sample_ids:
            self._record_sample_ids(ids)
        scalars = self.runner.step(batches, self.step + 1, t_step)
        if hasattr(self.producer, "step_scalars"):
            scalars.update(self.producer.step_scalars())
        if getattr(self.runner, "histograms", None):  # a fusion teacher's a* per expert (kd.fusion.stats)
            self.metrics.log_histograms(self.step + 1, self.runner.histograms)
        if hasattr(self.producer, "step_samples"):  # generated pairs for people to read (on_policy.sample_interval)
            self.metrics.log_samples(self.step + 1, self.producer.step_samples())
        if scalars.pop("applied"):
            self.nonfinite_in_a_row = 0
        else:
            self._count_nonfinite(scalars)
        scalars["train/skipped_steps"] = self.nonfinite_total
        return scalars

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

    # ------------------------------------------------------------------ eval
    def _evaluate(self) -> dict[str, float]:
        """Held-out metrics over loss tokens of the whole eval split: student/teacher perplexity, KL(teacher||student)
        at temperature 1, top-1 agreement (kd.eval_metrics, the same loop `kd eval` runs). Every rank runs the same
        number of forwards (a ZeRO-3 forward is a collective); `eval_batches` pads a short share with a weightless
        sample. Sums are all-reduced once, then divided by the global token count."""
        if self.eval_ds is None or len(self.eval_ds) == 0:
            return {}
        student = self.student.engine.module.student
        student.eval()
        batches = (self.producer.to_device(samples) for samples in eval_batches(
            self.eval_ds, rank=self.rank, world_size=self.world, micro_batch_size=self.recipe.train.micro_batch_size,
            max_batches=self.recipe.eval.max_batches))
        # logits stay in the model dtype: the metric sums upcast one bounded block of rows at a time
        sums = evaluate_batches(
            batches, vocab_size=self.vocab_size, sums=torch.zeros(len(SUM_FIELDS), dtype=torch.float64, device=self.device),
            teacher=self._eval_teacher,
            student=lambda b: student(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                      use_cache=False).logits)
        student.train()
        scalars = finish(dist.all_reduce_sum(sums))
        self.metrics.log_eval(self.step, scalars)
        return scalars

    def _eval_teacher(self, batch: dict[str, torch.Tensor]):
        """Dense logits, or a store's sparse output (kd.eval_metrics takes either)."""
        signals = self.teacher.info.signals
        if "dense" in signals:
            return self.teacher(batch).logits
        return self.teacher(batch, TeacherRequest(signal="sparse"))

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> None:
        client_state = {
            "step": self.step,
            "phase": PHASE,
            "participant": self.student.role,
            **self.producer.state_dict(),  # global_sample_index
            "world_size": self.world,
            "recipe": dump_recipe(self.recipe),
            "loss_state": {k: v for k, v in self.loss.state_dict().items() if k.endswith("_extra_state")},
            "skipped_steps": self.nonfinite_total,
        }
        rank_state = self.producer.rank_state() if hasattr(self.producer, "rank_state") else None
        tag = checkpoint.save(self.student.engine, self.student.ckpt_dir, step=self.step, client_state=client_state,
                              write_meta=self._write_meta, keep_last=self.recipe.checkpoint.keep_last,
                              lineage=self.lineage, rank_state=rank_state)
        self.metrics.print(f"kd: saved checkpoint {os.path.join(self.ckpt_dir, tag)}")

    def _write_meta(self, meta_dir: str) -> None:
        os.makedirs(meta_dir, exist_ok=True)
        self.student.engine.module.student.config.save_pretrained(meta_dir)
        self.tokenizer.save_pretrained(meta_dir)
        with open(os.path.join(meta_dir, "recipe.yaml"), "w") as f:
            f.write(dump_recipe(self.recipe))
        # human-readable facts about the checkpoint; resume reads them before building the engine
        meta = {"step": self.step, "phase": PHASE, "global_sample_index": self.producer.sample_index,
                "world_size": self.world,
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
        state, rank_state = checkpoint.load(self.student.engine, plan.ckpt_dir, plan.tag, rng_dir=plan.source_dir)
        self.step = int(state["step"])
        self.producer.load_state_dict(state)
        if hasattr(self.producer, "load_rank_state"):
            self.producer.load_rank_state(rank_state)
        self.nonfinite_total = int(state.get("skipped_steps", 0))
        if state.get("loss_state"):
            self.loss.load_state_dict(state["loss_state"], strict=False)
        self._truncate_sample_ids(self.step)
        self._log(f"kd: resumed from {plan.source_dir} at step {self.step} "
                  f"(global sample index {self.producer.sample_index})")
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
            for name in os.listdir(folder) if os.path.isdir(folder) else ():
                path = os.path.join(folder, name)
                with open(path) as f:
                    keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
                atomic_write(path, "".join(keep))

        if self.recipe.run.record_sample_ids:  # rank 0 looks at the folder: every rank takes the same branch
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


class TrainingDiverged(Exception):
    """Too many consecutive non-finite steps; the run stops without writing a checkpoint."""

