"""TAID on 2 CPU ranks with the real launcher: t identical on both ranks, and exact after a resume.

Run A trains 6 steps with a checkpoint at step 3; run B (another run directory) resumes from A's step-3 checkpoint
and trains steps 4-6. B's logged taid/t, taid/m and taid/J must equal A's bit for bit. Both runs use
`RecordingTAID` (a dotted-path loss defined below), which writes from *every* rank the t each forward used and the
state after each step, so the test can also compare the two ranks (metrics.jsonl only holds rank 0's view).

alpha = 1 over 6 steps makes the adaptive term, not the linear floor, decide t on some steps. Whichever decides it
after the resume, B's taid/m at step 4 is beta * m_3 + (1 - beta) * (J_prev - J_4) / J_prev and J_4 depends on the
t that step 4 trained with, so equal records mean t, m and J_prev were all restored exactly.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kd.losses.taid import TAIDLoss
from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import REPO, run_kd, train_records

pytestmark = pytest.mark.integration

TAID = {"t_start": 0.2, "t_end": 1.0, "alpha": 1.0, "beta": 0.5, "adaptive": True}
STEPS = 6


class RecordingTAID(TAIDLoss):
    """TAIDLoss that appends to ``record_dir/rank{RANK}.jsonl`` the t of every forward and the state of every step."""

    def __init__(self, cfg, *, context, record_dir: str):
        super().__init__(cfg, context=context)
        self.record_path = Path(record_dir) / f"rank{os.environ.get('RANK', '0')}.jsonl"
        self.record_path.parent.mkdir(parents=True, exist_ok=True)

    def _write(self, record: dict) -> None:
        with open(self.record_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def forward(self, inputs):
        self._write({"forward_at": inputs.step - 1, "t": self.t})  # steps completed so far (inputs.step is 1-based)
        return super().forward(inputs)

    def on_step_end(self, step, metrics):
        out = super().on_step_end(step, metrics)
        self._write({"step": step, **out})
        return out


def _check(result):
    assert result.returncode == 0, f"kd failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _taid(records: dict[int, dict], steps) -> list[tuple[float, float, float]]:
    return [(records[s]["taid/t"], records[s]["taid/m"], records[s]["taid/J"]) for s in steps]


def test_taid_same_t_on_both_ranks_and_exact_after_resume(tmp_path):
    recipe = make_tiny_run(
        tmp_path,
        loss={"name": f"{__name__}.RecordingTAID", "taid": TAID, "options": {"record_dir": str(tmp_path / "rec")}},
        train={"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "seed": 0},
        eval={"interval": 3, "max_batches": 1},
        checkpoint={"interval": 3, "keep_last": 2},
    )
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    _check(run_kd("train", str(recipe), "--nproc", "2", env=env))
    run_a = train_records(tmp_path / "run")
    assert sorted(run_a) == list(range(1, STEPS + 1))

    # Resume A's step-3 checkpoint in a fresh run directory and train to the same end. The loss section stays as
    # it was (a changed loss refuses to resume), so B records into the same directory, emptied first.
    (tmp_path / "rec").rename(tmp_path / "rec_a")
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    _check(run_kd("train", str(recipe), "--nproc", "2", f"run.output_dir={tmp_path / 'run_b'}", f"resume={ckpt}",
                  env=env))
    (tmp_path / "rec").rename(tmp_path / "rec_b")
    run_b = train_records(tmp_path / "run_b")
    assert sorted(run_b) == [4, 5, 6]

    # Exact: the resumed run continues with the very t, m, J_prev the checkpoint held.
    assert _taid(run_b, range(4, 7)) == _taid(run_a, range(4, 7))
    ts = [run_a[s]["taid/t"] for s in range(1, STEPS + 1)]
    assert ts[0] == TAID["t_start"] and ts[-1] == TAID["t_end"]
    assert all(b >= a for a, b in zip(ts, ts[1:]))
    t_lin = [0.2 + 0.8 * s / STEPS for s in range(1, STEPS + 1)]
    assert any(t > lin + 1e-9 for t, lin in zip(ts[1:5], t_lin[1:5])), (ts, "the adaptive term never decided t")

    for rec_dir, first in ((tmp_path / "rec_a", 1), (tmp_path / "rec_b", 4)):
        rank0, rank1 = _records(rec_dir / "rank0.jsonl"), _records(rec_dir / "rank1.jsonl")
        steps0 = [r for r in rank0 if "step" in r]
        # Both ranks hold the same t (and m, J) after every step, and every forward on both used the same t.
        assert [r for r in rank1 if "step" in r] == steps0
        assert [r for r in rank1 if "forward_at" in r] == [r for r in rank0 if "forward_at" in r]
        # Once per optimizer step: one update per step (grad_accum 2 -> two forwards per step), none in eval.
        assert [r["step"] for r in steps0] == list(range(first, STEPS + 1))
        forwards = [r for r in rank0 if "forward_at" in r]
        assert [r["forward_at"] for r in forwards] == [s for s in range(first - 1, STEPS) for _ in range(2)]
        # The forward of step s trains with the t after s - 1 updates.
        t_after = {0: TAID["t_start"], **{s: run_a[s]["taid/t"] for s in run_a}}
        assert all(r["t"] == t_after[r["forward_at"]] for r in forwards)
