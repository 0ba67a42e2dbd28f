"""What the phases of a compete round run on: the round's Trainer (student engine + teacher source), the backends
built on them, the judge model, and the per-round training recipe. Kept apart from rounds.py so the loop reads as
phases."""
from __future__ import annotations

import gc
import os
from typing import Any, Optional

from kd.assets import resolve
from kd.config.schema import Recipe
from kd.errors import UserError


def round_recipe(recipe: Recipe, r: int, train_path: str, student_dir: str, teacher_path: Optional[str] = None
                 ) -> Recipe:
    """The training recipe of round r's imitation: the recipe's student, teacher, loss and optimizer on the pool of
    round r - 1 (chat jsonl), continuing the student run to r x imitation_steps optimizer steps. The data changes
    between rounds by design, so the resume check is told to allow it. ``teacher_path``: a teacher trained by an
    earlier teacher phase (an exported model directory) in place of the recipe's."""
    raw = recipe.model_dump()
    raw["run"]["output_dir"] = student_dir
    if teacher_path is not None:
        raw["tokenizer"] = recipe.tokenizer or recipe.teacher.path  # the tokenizer stays the recipe's
        raw["teacher"].update(path=teacher_path, gguf_file=None, config=None)
    raw["data"].update(kind="chat", train={"path": train_path, "split": "train", "name": None},
                       messages_field="messages", max_documents=None)
    raw["train"].update(max_steps=r * recipe.compete.imitation_steps, epochs=None)
    raw["checkpoint"].update(allow_recipe_change=True, at_end=True)
    raw.update(resume="auto", on_policy=None, compete=None)
    return Recipe.model_validate(raw)


def teacher_recipe(recipe: Recipe, steps: int, train_path: str, teacher_dir: str) -> Recipe:
    """The teacher phase's training recipe: the teacher model as the trained participant (its own engine and
    checkpoints in ``teacher_dir``, one run continuing across rounds to ``steps`` steps), cross-entropy on the answers
    the student won with; the recipe's teacher stays the frozen reference its held-out KL is measured against."""
    raw = recipe.model_dump()
    t = recipe.teacher
    raw["run"]["output_dir"] = teacher_dir
    raw["tokenizer"] = recipe.tokenizer or t.path
    raw["student"] = {"path": t.path, "gguf_file": t.gguf_file, "dtype": t.dtype, "trust_remote_code": t.trust_remote_code,
                      "zero_stage": recipe.student.zero_stage, "offload_optimizer": recipe.student.offload_optimizer,
                      "gradient_checkpointing": recipe.student.gradient_checkpointing}
    raw["data"].update(kind="chat", train={"path": train_path, "split": "train", "name": None},
                       messages_field="messages", max_documents=None)
    raw["loss"] = {"name": "ce"}
    raw["train"].update(max_steps=steps, epochs=None, lr=recipe.compete.teacher_lr or recipe.train.lr)
    raw["checkpoint"].update(allow_recipe_change=True, at_end=True)
    raw.update(resume="auto", on_policy=None, compete=None)
    return Recipe.model_validate(raw)


def load_seeds(recipe: Recipe) -> list[str]:
    """The distinct seed instructions of data.train (capped by compete.max_seed_instructions) that are not in the
    held-out set; a UserError when fewer than compete.min_pool remain."""
    from kd.compete.pool import seed_instructions
    from kd.data.sources import load_source

    data, cfg = recipe.data, recipe.compete
    fields = dict(prompt_field=data.prompt_field, messages_field=data.messages_field)
    held_out = set(eval_instructions(recipe))
    rows = [row for row in load_source(data.train, key="data.train", resolve_path=resolve)]
    seeds = [s for s in seed_instructions(rows, minimum=0, key="data.train.path", **fields) if s not in held_out]
    seeds = seeds[: cfg.max_seed_instructions] if cfg.max_seed_instructions else seeds
    if len(seeds) < cfg.min_pool:
        raise UserError(f"the instruction pool would start with {len(seeds)} distinct instruction(s) (after leaving "
                        f"out those in data.eval), fewer than compete.min_pool ({cfg.min_pool}); give more seed "
                        "instructions or lower compete.min_pool", key="data.train.path")
    return seeds


def eval_instructions(recipe: Recipe) -> list[str]:
    from kd.compete.pool import instruction_of
    from kd.data.sources import load_source

    data = recipe.data
    rows = load_source(data.eval, key="data.eval", resolve_path=resolve)
    texts = (instruction_of(row, prompt_field=data.prompt_field, messages_field=data.messages_field).strip()
             for row in rows)
    return [t for t in texts if t]


def judge_model_config(recipe: Recipe):
    from kd.config.schema import TeacherConfig

    src = recipe.compete.judge.model
    return TeacherConfig(**src.model_dump(), zero_stage=0)


def check_judge(recipe: Recipe, tokenizer: Any) -> type:
    """The judge class, its threshold inside its scale, and a separate judge model's tokenizer where it must be the
    recipe's (cheap: configs and tokenizers only)."""
    from kd.compete.judges import check_threshold, judge_class

    cfg = recipe.compete.judge
    cls = judge_class(cfg.name)
    check_threshold(cls, cfg.threshold)
    if cfg.model is not None:
        if cfg.model.path is None:
            raise UserError("a judge model needs `path` (a model directory or asset:NAME)", key="compete.judge.model.path")
        path = resolve(cfg.model.path)
        if not os.path.isdir(path):
            raise UserError(f"{cfg.model.path} does not exist", key="compete.judge.model.path")
        if getattr(cls, "needs_same_tokenizer", False):
            from kd.models import load_tokenizer

            judge_tok = load_tokenizer(path, gguf_file=cfg.model.gguf_file, key="compete.judge.model.path")
            mine, theirs = tokenizer.get_vocab(), judge_tok.get_vocab()
            differ = sum(mine.get(t) != theirs.get(t) for t in mine.keys() | theirs.keys())
            if differ:
                raise UserError(f"the {cfg.name} judge scores the recipe's tokens, so its model needs the recipe's "
                                f"tokenizer, but {differ} tokens differ (sizes {len(mine)} vs {len(theirs)}); use a "
                                "model of the teacher's family or the prompted judge", key="compete.judge.model.path")
    return cls


class RoundModels:
    """The models of one round on this rank: round 0 has the teacher alone; rounds >= 1 a Trainer whose imitation
    phase has run (``train()`` resumes the student; when the round's steps are already done it only loads)."""

    def __init__(self):
        self.round: Optional[int] = None
        self.trainer = None
        self.teacher = None
        self.vocab_size: Optional[int] = None
        self._judge_model = None

    def release(self) -> None:
        self.trainer = self.teacher = None
        self.round = None
        gc.collect()

    def teacher_only(self, recipe: Recipe, device) -> None:
        from kd.teachers import build_teacher_source

        self.release()
        self.teacher = build_teacher_source(recipe, device=device, resolve_path=resolve)
        self.round = 0

    def trained(self, recipe: Recipe, r: int) -> bool:
        """Build and run round r's imitation; False when it stopped on a signal before its last step."""
        self.release()
        trainer = train(recipe)
        self.trainer, self.teacher, self.vocab_size, self.round = trainer, trainer.teacher, trainer.vocab_size, r
        return trainer.step >= trainer.total_steps

    def judge_model(self, recipe: Recipe, device):
        """A separate judge model (a replica on every rank), loaded once per process."""
        if self._judge_model is None:
            from kd.models import load_teacher

            self._judge_model = load_teacher(judge_model_config(recipe), zero3_config=None,
                                             resolve_path=resolve).to(device)
        return self._judge_model


def train(recipe: Recipe):
    """A kd Trainer for ``recipe``, trained (resumed from its run directory's newest checkpoint when there is one)."""
    from kd.trainer import Trainer

    trainer = Trainer(recipe)
    trainer.train()
    return trainer
