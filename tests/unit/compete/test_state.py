"""The round state machine: the phase order over K rounds, and partial results that survive a kill between the
partial file's write and the state's."""
from __future__ import annotations

import pytest

from kd.compete.state import RoundState, RunFiles


def test_phases_over_two_rounds():
    state, seen = RoundState(), []
    while not state.done:
        seen.append((state.round, state.phase))
        state = state.next(2)
    assert seen == [(0, "answer"),
                    (1, "imitation"), (1, "discrimination"), (1, "augment"), (1, "answer"),
                    (2, "imitation"), (2, "discrimination"), (2, "augment"), (2, "answer")]


def test_the_teacher_phase_comes_after_discrimination_when_on():
    state, seen = RoundState(1, "imitation"), []
    while not state.done:
        seen.append(state.phase)
        state = state.next(1, teacher_phase=True)
    assert seen == ["imitation", "discrimination", "teacher", "augment", "answer"]


def test_state_and_partial_roundtrip(tmp_path):
    files = RunFiles(str(tmp_path))
    assert files.load_state() is None
    files.save_state(RoundState(1, "discrimination", 4))
    assert files.load_state() == RoundState(1, "discrimination", 4)
    rows = [{"id": i} for i in range(6)]  # a kill after the partial write of items 4-5, before the state's
    files.write_partial(1, "discrimination", rows)
    assert files.read_partial(1, "discrimination", 4) == rows[:4]
    with pytest.raises(RuntimeError, match="changed by hand"):
        files.read_partial(1, "discrimination", 7)
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
