"""Where a compete run is: the round, the phase and the item inside the phase, plus the files each phase leaves.

Layout of ``run.output_dir``:
    compete/state.json              {"round", "phase", "item"}: written atomically after every chunk of items
    compete/rounds.jsonl            one record per finished round (win rate, hard fraction, pool size, drops, eval)
    compete/round_RR/pool.jsonl     the pool after round RR (round_00: the seed instructions, teacher-answered)
    compete/round_RR/train.jsonl    the pool of round RR-1 as chat training data (imitation)
    compete/round_RR/scores.jsonl   discrimination: instruction, both answers, scores, hard
    compete/round_RR/split.json     hard and easy ids, pairs left out
    compete/round_RR/candidates.jsonl  generation: every candidate with its seed and its drop reason (null = kept)
    compete/round_RR/PHASE.partial.jsonl  the finished items of a phase in progress
    compete/round_RR/teacher_train.jsonl  teacher phase: the instructions the student won, with its answers
    compete/round_RR/teacher_hf/    the teacher after round RR's teacher phase (answers and judges from round RR+1)
    student/                        the student's training run (kd.trainer: checkpoints/, metrics.jsonl, ...)
    teacher/                        the teacher's training run (teacher phase only)

A phase's items are done in chunks; after each chunk the partial file and then the state are replaced atomically, so
a run killed at any moment finds a state whose item count the partial file covers (extra rows from a kill between the
two writes are dropped) and redoes at most one chunk. Round 0 has only the answer phase (the teacher answers the seed
instructions); rounds 1..K go imitation -> discrimination -> [teacher] -> augment -> answer.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Optional

from kd.compete.pool import read_jsonl, write_jsonl
from kd.files import atomic_write

PHASES = ("imitation", "discrimination", "teacher", "augment", "answer")
DONE = "done"


@dataclass
class RoundState:
    round: int = 0
    phase: str = "answer"
    item: int = 0

    def next(self, rounds: int, *, teacher_phase: bool = False) -> "RoundState":
        """The state after this phase finished (the teacher phase only when it is switched on)."""
        if self.phase == "answer":
            return RoundState(self.round + 1, "imitation") if self.round < rounds else RoundState(self.round, DONE)
        following = PHASES[PHASES.index(self.phase) + 1]
        if following == "teacher" and not teacher_phase:
            following = "augment"
        return RoundState(self.round, following)

    @property
    def done(self) -> bool:
        return self.phase == DONE


class RunFiles:
    """Paths and atomic reads/writes of a compete run directory (every write is rank 0's; see rounds.py)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.root = os.path.join(run_dir, "compete")
        self.student_dir = os.path.join(run_dir, "student")
        self.teacher_dir = os.path.join(run_dir, "teacher")

    def round_dir(self, r: int) -> str:
        return os.path.join(self.root, f"round_{r:02d}")

    def path(self, r: int, name: str) -> str:
        return os.path.join(self.round_dir(r), name)

    # ------------------------------------------------------------------ state
    @property
    def state_path(self) -> str:
        return os.path.join(self.root, "state.json")

    def load_state(self) -> Optional[RoundState]:
        if not os.path.isfile(self.state_path):
            return None
        with open(self.state_path) as f:
            return RoundState(**json.load(f))

    def save_state(self, state: RoundState) -> None:
        os.makedirs(self.root, exist_ok=True)
        atomic_write(self.state_path, json.dumps(asdict(state)) + "\n")

    # ------------------------------------------------------------------ partial phase results
    def partial(self, r: int, phase: str) -> str:
        return self.path(r, f"{phase}.partial.jsonl")

    def read_partial(self, r: int, phase: str, count: int) -> list[dict[str, Any]]:
        """The first ``count`` finished items of a phase (the state's item index)."""
        path = self.partial(r, phase)
        rows = read_jsonl(path) if os.path.isfile(path) else []
        if len(rows) < count:
            raise RuntimeError(f"{path} holds {len(rows)} items but the run state says {count} are done; the run "
                               "directory was changed by hand")
        return rows[:count]

    def write_partial(self, r: int, phase: str, rows: list[dict[str, Any]]) -> None:
        write_jsonl(self.partial(r, phase), rows)

    def pool(self, r: int) -> list[dict[str, Any]]:
        return read_jsonl(self.path(r, "pool.jsonl"))

    def teacher_export(self, r: int) -> str:
        return self.path(r, "teacher_hf")

    def current_teacher(self, r: int) -> Optional[str]:
        """The newest trained teacher a round r may use (exported by an earlier round's teacher phase), or None."""
        for earlier in range(r - 1, 0, -1):
            if os.path.isdir(self.teacher_export(earlier)):
                return self.teacher_export(earlier)
        return None
