"""The compete loop on every rank: K rounds of imitation -> discrimination -> augment -> answer (state.py has the
phases and the files they leave).

- imitation: the student trains on the previous round's pool with kd's own Trainer (checkpoints, exact resume).
- discrimination: the student answers pool instructions (the teacher's answers are the pool's); the judge scores
  each pair; hard = teacher - student >= threshold.
- augment: the teacher, shown one hard or easy seed at a time, writes new instructions; the filters drop candidates
  that are cut off, too short, restate the prompt, or near-duplicate the pool, the held-out set or a kept candidate.
- answer: the teacher answers the survivors (round 0: the seed instructions) and the pool grows.

Every generation and log-prob runs batched on the engines, dealt across ranks and gathered (backend.py), so every
rank holds the same lists; rank 0 alone writes files (`dist.run_on_main`). Items are processed in fixed chunks with
seeded streams per chunk, so a resumed run produces the same items as an uninterrupted one.
"""
from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from typing import Any, Callable

from kd.compete.augment import augment_prompt, clean_candidate, pick_seeds
from kd.compete.backend import ModelBackend
from kd.compete.filters import REASONS, Candidate, filter_candidates
from kd.compete.judges import Pair, judge_class
from kd.compete.models import RoundModels, eval_instructions, load_seeds, round_recipe
from kd.compete.pool import as_chat, grow, read_jsonl, split_hard_easy, write_jsonl
from kd.compete.state import RoundState, RunFiles
from kd.config.schema import Recipe
from kd.engine import dist
from kd.errors import UserError
from kd.files import atomic_write


class Stopped(Exception):
    """SIGTERM/SIGINT: the run stopped at a chunk boundary (or inside imitation, after the Trainer saved)."""


class CompeteRun:
    def __init__(self, recipe: Recipe):
        dist.init()
        if recipe.resume not in ("auto", "never"):
            raise UserError("kd compete resumes from its own run directory; set resume: auto (or never)", key="resume")
        from kd.preflight import load_recipe_tokenizer

        self.recipe, self.cfg = recipe, recipe.compete
        self.files = RunFiles(recipe.run.output_dir)
        self.tokenizer = load_recipe_tokenizer(recipe)
        self.judge = judge_class(self.cfg.judge.name)(self.cfg.judge)
        self.models = RoundModels()
        self.seed = recipe.train.seed
        self.stop_requested = False

    # ------------------------------------------------------------------ the loop
    def run(self) -> RoundState:
        state = dist.run_on_main(self._start_state, share_result=True)
        self._install_signal_handlers()
        while not state.done:
            self._log(f"kd compete: round {state.round}, {state.phase}" + (f" from item {state.item}" if state.item else ""))
            self._ensure_models(state)
            if state.phase != "imitation":
                getattr(self, f"_{state.phase}")(state)  # _discrimination, _teacher, _augment, _answer
            if os.environ.get("KD_COMPETE_EXIT_AT") == f"{state.round}:{state.phase}:end":
                os._exit(137)  # fault injection: killed after the phase's work, before the state moved on
            state = state.next(self.cfg.rounds, teacher_phase=self.cfg.teacher_steps > 0)
            dist.run_on_main(lambda s=state: self.files.save_state(s))
        self._log(f"kd compete: {self.cfg.rounds} round(s) done; pool and round records in {self.files.root}")
        self.models.release()
        dist.barrier()
        return state

    def _start_state(self) -> RoundState:
        """Rank 0: the saved state, or a fresh one (an earlier run's folders are moved aside, never deleted)."""
        state = self.files.load_state() if self.recipe.resume == "auto" else None
        if state is not None:
            return state
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        for folder in (self.files.root, self.files.student_dir):
            if os.path.exists(folder):
                os.replace(folder, f"{folder}.before-{stamp}")
                print(f"kd compete: starting fresh; moved the earlier {folder} to {folder}.before-{stamp}", flush=True)
        state = RoundState(0, "answer", 0)
        self.files.save_state(state)
        return state

    def _ensure_models(self, state: RoundState) -> None:
        r = state.round
        if self.models.round == r:
            return
        if r == 0:
            self.models.teacher_only(self.recipe, dist.device())
            info = self.models.teacher.info
            self.models.vocab_size = min(len(self.tokenizer), int(info.vocab_size))
            return
        train_path = self.files.path(r, "train.jsonl")
        dist.run_on_main(lambda: write_jsonl(train_path, as_chat(self.files.pool(r - 1))))
        recipe = round_recipe(self.recipe, r, train_path, self.files.student_dir, self.files.current_teacher(r))
        finished = self.models.trained(recipe, r)
        self._install_signal_handlers()  # the Trainer installed its own for the imitation phase
        if not finished:
            raise Stopped(f"stopped during round {r}'s imitation (the student checkpoint is saved)")

    # ------------------------------------------------------------------ backends
    def _backend(self, target, tokenizer=None, vocab_size: Any = "recipe") -> ModelBackend:
        from kd.models.vocab import max_positions

        limit = max_positions(target.model.config) or self.recipe.data.seq_len
        return ModelBackend(target, tokenizer or self.tokenizer, seed=self.seed, batch_size=self.cfg.batch_size,
                            max_prompt_tokens=min(limit, 4096),
                            vocab_size=self.models.vocab_size if vocab_size == "recipe" else vocab_size)

    def _teacher_backend(self) -> ModelBackend:
        from kd.generation import teacher_target

        return self._backend(teacher_target(self.models.teacher))

    def _student_backend(self) -> ModelBackend:
        from kd.generation import student_target

        return self._backend(student_target(self.models.trainer.student.engine))

    def _judge_backend(self) -> ModelBackend:
        if self.cfg.judge.model is None:
            return self._teacher_backend()
        from kd.generation import Target
        from kd.models import load_tokenizer
        from kd.assets import resolve

        model = self.models.judge_model(self.recipe, dist.device())
        if getattr(self.judge, "needs_same_tokenizer", False):
            return self._backend(Target(model))
        # a text judge reads and writes with its own tokenizer (its pad and EOS ids too)
        tokenizer = load_tokenizer(resolve(self.cfg.judge.model.path), gguf_file=self.cfg.judge.model.gguf_file,
                                   key="compete.judge.model.path")
        return self._backend(Target(model), tokenizer, vocab_size=None)

    # ------------------------------------------------------------------ chunked work
    def _chunked(self, state: RoundState, items: list, work: Callable[[list, int], list[dict[str, Any]]]
                 ) -> list[dict[str, Any]]:
        """Every item's result row, doing the items after ``state.item`` in chunks and saving after each chunk."""
        r, phase = state.round, state.phase
        done = self.files.read_partial(r, phase, state.item) if state.item else []
        for start in range(len(done), len(items), self.cfg.chunk):
            done = done + work(items[start:start + self.cfg.chunk], start)
            progress = RoundState(r, phase, len(done))
            dist.run_on_main(lambda d=done, s=progress: (self.files.write_partial(r, phase, d), self.files.save_state(s)))
            if os.environ.get("KD_COMPETE_EXIT_AT") == f"{r}:{phase}:{len(done)}":
                os._exit(137)  # fault injection for the resume tests: a kill right after this chunk was saved
            if dist.any_rank(self.stop_requested) and len(done) < len(items):
                raise Stopped(f"stopped in round {r}'s {phase} at item {len(done)} of {len(items)}")
        return done

    def _stream(self, state: RoundState, start: int, part: int = 0) -> int:
        """A sampling stream per (round, phase, chunk start, part), the same whether or not the run was resumed."""
        from kd.compete.state import PHASES

        return ((state.round * len(PHASES) + PHASES.index(state.phase)) * 1_000_003 + start) * 4 + part

    # ------------------------------------------------------------------ phases
    def _discrimination(self, state: RoundState) -> None:
        r, cfg = state.round, self.cfg
        pool = self.files.pool(r - 1)
        ids = [item["id"] for item in pool if item["answer"].strip()]
        if cfg.judge_max and cfg.judge_max < len(ids):
            ids = sorted(random.Random(f"kd-compete:{self.seed}:{r}").sample(ids, cfg.judge_max))
        student, judge_backend = self._student_backend(), self._judge_backend()

        def work(chunk: list[int], start: int) -> list[dict[str, Any]]:
            questions = [pool[i]["instruction"] for i in chunk]
            answers = student.generate(questions, temperature=cfg.answer_temperature,
                                       stream=self._stream(state, start, 0), max_new_tokens=cfg.answer_max_new_tokens)
            pairs = [Pair(q, pool[i]["answer"], a) for q, i, a in zip(questions, chunk, answers)]
            verdicts = self.judge.score(pairs, judge_backend, stream=self._stream(state, start, 1))
            return [{"id": i, "instruction": p.instruction, "teacher_answer": p.teacher, "student_answer": p.student,
                     "teacher": v.teacher, "student": v.student, "attempts": v.attempts}
                    for i, p, v in zip(chunk, pairs, verdicts)]

        rows = self._chunked(state, ids, work)
        hard, easy = split_hard_easy(rows, cfg.judge.threshold)
        hard_set = set(hard)
        for row in rows:
            row["hard"] = row["id"] in hard_set if row["teacher"] is not None else None

        def write() -> None:
            write_jsonl(self.files.path(r, "scores.jsonl"), rows)
            atomic_write(self.files.path(r, "split.json"), json.dumps(
                {"hard": hard, "easy": easy, "left_out": len(rows) - len(hard) - len(easy)}) + "\n")

        dist.run_on_main(write)

    def _teacher(self, state: RoundState) -> None:
        """Train the teacher on the instructions where the student's answer scored higher (the student's answers as
        targets); export it for the next rounds. This round's augment and answer phases keep the round's teacher."""
        from kd.compete.models import teacher_recipe, train
        from kd.export import export_checkpoint

        r = state.round
        won = [s for s in read_jsonl(self.files.path(r, "scores.jsonl"))
               if s["teacher"] is not None and s["student"] > s["teacher"] and s["student_answer"].strip()]
        data = self.files.path(r, "teacher_train.jsonl")
        dist.run_on_main(lambda: write_jsonl(data, as_chat([{"id": s["id"], "instruction": s["instruction"],
                                                            "answer": s["student_answer"]} for s in won])))
        if not won:
            self._log(f"kd compete: round {r}: the student won no instruction; the teacher stays as it is")
            return
        phases = sum(bool(read_jsonl(self.files.path(k, "teacher_train.jsonl"))) for k in range(1, r + 1))
        self.models.release()  # the round's engines are rebuilt (and reloaded) for the augment phase
        trainer = train(teacher_recipe(self.recipe, phases * self.cfg.teacher_steps, data, self.files.teacher_dir))
        finished = trainer.step >= trainer.total_steps
        del trainer
        self._install_signal_handlers()
        if not finished:
            raise Stopped(f"stopped during round {r}'s teacher phase (the teacher checkpoint is saved)")
        out = self.files.teacher_export(r)
        dist.run_on_main(lambda: os.path.isdir(out) or export_checkpoint(os.path.join(self.files.teacher_dir, "checkpoints"), out))

    def _augment(self, state: RoundState) -> None:
        r, aug = state.round, self.cfg.augment
        pool = self.files.pool(r - 1)
        with open(self.files.path(r, "split.json")) as f:
            split = json.load(f)
        seeds = [(i, "hard") for i in pick_seeds(split["hard"], aug.hard)] + \
                [(i, "easy") for i in pick_seeds(split["easy"], aug.easy)]
        teacher = self._teacher_backend()

        def work(chunk: list[tuple[int, str]], start: int) -> list[dict[str, Any]]:
            prompts = [augment_prompt(pool[i]["instruction"], kind) for i, kind in chunk]
            replies = teacher.generate_full(prompts, temperature=aug.temperature, stream=self._stream(state, start),
                                            max_new_tokens=aug.max_new_tokens)
            return [{"seed_id": i, "kind": kind, "prompt": p, "reply": text, "candidate": clean_candidate(text),
                     "finish_reason": reason} for (i, kind), p, (text, reason) in zip(chunk, prompts, replies)]

        rows = self._chunked(state, seeds, work)
        known = [item["instruction"] for item in pool] + eval_instructions(self.recipe)
        result = filter_candidates([Candidate(row["candidate"], row["prompt"], row["finish_reason"]) for row in rows],
                                   known, min_words=aug.min_words, restate_threshold=aug.restate_threshold,
                                   rouge_threshold=aug.rouge_threshold)
        for row, reason in zip(rows, result.reasons):
            row["dropped"] = reason
        dist.run_on_main(lambda: write_jsonl(self.files.path(r, "candidates.jsonl"), rows))

    def _answer(self, state: RoundState) -> None:
        r, cfg = state.round, self.cfg
        if r == 0:
            questions = [(q, "seed") for q in load_seeds(self.recipe)]
        else:
            kept = [row for row in read_jsonl(self.files.path(r, "candidates.jsonl")) if row["dropped"] is None]
            questions = [(row["candidate"], row["kind"]) for row in kept]
        teacher = self._teacher_backend()

        def work(chunk: list[tuple[str, str]], start: int) -> list[dict[str, Any]]:
            replies = teacher.generate_full([q for q, _ in chunk], temperature=cfg.answer_temperature,
                                            stream=self._stream(state, start), max_new_tokens=cfg.answer_max_new_tokens)
            return [{"instruction": q, "origin": o, "answer": text.strip(), "finish_reason": reason}
                    for (q, o), (text, reason) in zip(chunk, replies)]

        rows = self._chunked(state, questions, work)
        before = self.files.pool(r - 1) if r > 0 else []
        pool = grow(before, [row["instruction"] for row in rows], [row["answer"] for row in rows], round=r,
                    origins=[row["origin"] for row in rows])
        _check_same_on_every_rank(pool, f"round {r}'s pool")
        dist.run_on_main(lambda: write_jsonl(self.files.path(r, "pool.jsonl"), pool))
        if r > 0:
            dist.run_on_main(lambda: self._write_round_record(r))

    # ------------------------------------------------------------------ records
    def round_record(self, r: int) -> dict[str, Any]:
        """The numbers of round r, from its files (so a resumed run writes the same record)."""
        scores = read_jsonl(self.files.path(r, "scores.jsonl"))
        judged = [s for s in scores if s["teacher"] is not None]
        wins = sum(1.0 if s["student"] > s["teacher"] else 0.5 if s["student"] == s["teacher"] else 0.0 for s in judged)
        candidates = read_jsonl(self.files.path(r, "candidates.jsonl"))
        drops = Counter({reason: 0 for reason in REASONS})
        drops.update(c["dropped"] for c in candidates if c["dropped"] is not None)
        pool, before = self.files.pool(r), self.files.pool(r - 1)
        record: dict[str, Any] = {
            "round": r, "judged": len(judged), "left_out": len(scores) - len(judged),
            "win_rate": wins / len(judged) if judged else None,
            "hard_fraction": sum(bool(s["hard"]) for s in judged) / len(judged) if judged else None,
            "mean_teacher_score": sum(s["teacher"] for s in judged) / len(judged) if judged else None,
            "mean_student_score": sum(s["student"] for s in judged) / len(judged) if judged else None,
            "candidates": len(candidates), "new_instructions": len(pool) - len(before), "pool_size": len(pool),
            **{f"dropped/{k}": v for k, v in sorted(drops.items())},
        }
        record.update(self._student_eval(r))
        if self.cfg.teacher_steps:
            record.update(self._teacher_eval(r))
        return record

    @staticmethod
    def _evals(run_dir: str) -> dict[int, dict[str, float]]:
        """step -> the eval/* scalars a kd training run logged at that step."""
        from kd.metrics import METRICS_FILE

        path = os.path.join(run_dir, METRICS_FILE)
        by_step: dict[int, dict] = {}
        for row in read_jsonl(path) if os.path.isfile(path) else []:
            if any(k.startswith("eval/") for k in row):
                by_step.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k.startswith("eval/")})
        return by_step

    def _student_eval(self, r: int) -> dict[str, float]:
        """The student's held-out metrics at the end of round r's imitation (and before any training, in round 1)."""
        by_step = self._evals(self.files.student_dir)
        out = dict(by_step.get(r * self.cfg.imitation_steps, {}))
        if r == 1 and 0 in by_step:
            out.update({k.replace("eval/", "eval_start/"): v for k, v in by_step[0].items()})
        return out

    def _teacher_eval(self, r: int) -> dict[str, float]:
        """The trained teacher's held-out metrics (KL against the recipe's frozen teacher) after its latest phase up
        to round r."""
        phases = sum(bool(read_jsonl(self.files.path(k, "teacher_train.jsonl"))) for k in range(1, r + 1))
        by_step = self._evals(self.files.teacher_dir)
        step = phases * self.cfg.teacher_steps
        return {k.replace("eval/", "teacher_eval/"): v for k, v in by_step.get(step, {}).items()} if phases else {}

    def _write_round_record(self, r: int) -> None:
        record = self.round_record(r)
        path = os.path.join(self.files.root, "rounds.jsonl")
        earlier = [row for row in read_jsonl(path) if row["round"] < r] if os.path.isfile(path) else []
        write_jsonl(path, [*earlier, record])
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(os.path.join(self.files.run_dir, "tensorboard")) as tb:
            for key, value in record.items():
                if key != "round" and isinstance(value, (int, float)) and value is not None:
                    tb.add_scalar(f"compete/{key}", value, r)
        print(f"kd compete: round {r}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in record.items() if k != "round"), flush=True)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self.stop_requested = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)

    def _log(self, message: str) -> None:
        if dist.is_main():
            print(message, flush=True)


def _check_same_on_every_rank(rows: list[dict[str, Any]], what: str) -> None:
    """Collective: every rank built ``rows`` from gathered results, so they must agree; a difference is a bug (a rank
    that decoded or filtered differently) and stops the run rather than training ranks on different pools."""
    import hashlib

    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    digests = dist.all_gather_object(digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"{what} differs between ranks (sha256 per rank: {', '.join(d[:12] for d in digests)})")
    if dist.is_main() and dist.world_size() > 1:
        print(f"kd compete: {what} is the same on all {len(digests)} ranks (sha256 {digest[:12]})", flush=True)
