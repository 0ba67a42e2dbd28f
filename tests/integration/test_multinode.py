"""Two "nodes" on one machine: launchers/multinode.sh per-node form (deepspeed --no_ssh --node_rank R), one
process each. The run trains, checkpoints, both nodes are killed, and the same commands resume it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.helpers.tiny_run import make_tiny_run
from tests.integration.conftest import REPO, last_step, train_records, wait_for

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nodes(tmp_path, recipe, tag):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    env = dict(os.environ, HOSTFILE=str(hostfile), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return [
        subprocess.Popen(["bash", "launchers/multinode.sh", "per-node", str(recipe)], cwd=REPO, start_new_session=True,
                         env={**env, "NODE_RANK": str(rank)}, stdout=open(tmp_path / f"{tag}-node{rank}.log", "w"),
                         stderr=subprocess.STDOUT)
        for rank in (0, 1)
    ]


def test_two_nodes_train_checkpoint_die_and_resume(tmp_path):
    recipe = make_tiny_run(
        tmp_path, train={"max_steps": 30, "micro_batch_size": 2, "grad_accum": 1, "lr": 1e-3, "seed": 0},
        eval={"interval": 0, "at_start": False, "max_batches": 1}, checkpoint={"interval": 2},
    )
    run_dir = tmp_path / "run"
    nodes = start_nodes(tmp_path, recipe, "first")
    wait_for(lambda: last_step(run_dir) >= 3, timeout=300, what="step 3 on two nodes", proc=nodes[0])
    for node in nodes:  # both nodes lose power
        os.killpg(node.pid, signal.SIGKILL)
        node.wait(timeout=60)
    subprocess.run(["pkill", "-9", "-f", str(recipe)], check=False)
    latest = (run_dir / "checkpoints" / "latest").read_text()
    saved_at = int(latest.removeprefix("step_"))
    assert 2 <= saved_at < 30, latest  # killed mid-run, after at least one checkpoint

    nodes = start_nodes(tmp_path, recipe, "second")
    codes = [node.wait(timeout=600) for node in nodes]
    log = (tmp_path / "second-node0.log").read_text()
    assert codes == [0, 0], log[-4000:]
    assert f"at step {saved_at}" in log and "2 rank(s)" in log
    assert sorted(train_records(run_dir)) == list(range(1, 31))
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000030"
