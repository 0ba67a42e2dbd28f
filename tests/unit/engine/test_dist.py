"""kd.engine.dist owns every collective: tensors reach the collective on the accelerator whatever device they start on,
no other module calls torch.distributed, and a failure on one rank reaches every rank as the same error."""
from __future__ import annotations

import ast
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kd.engine import dist

KD = Path(__file__).resolve().parents[3] / "kd"
COLLECTIVES = {
    "all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast", "broadcast_object_list",
    "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather", "gather_object", "scatter", "scatter_object_list",
    "all_to_all", "all_to_all_single", "barrier", "send", "recv", "isend", "irecv", "monitored_barrier",
}


def _distributed_uses(path: Path) -> list[str]:
    """Imports of torch.distributed / deepspeed.comm, and calls of a collective on any name bound to them."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in ("torch.distributed", "deepspeed.comm"):
                    aliases.add(a.asname or a.name)
                    found.append(f"import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith(("torch.distributed", "deepspeed.comm")) or (
                    node.module in ("torch", "deepspeed") and any(a.name in ("distributed", "comm") for a in node.names)):
                aliases.update(a.asname or a.name for a in node.names)
                found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            base = ast.unparse(node.func.value)
            if base in aliases or base.endswith(("torch.distributed", "deepspeed.comm")):
                found.append(f"{base}.{node.func.attr}()")
    return found


def test_no_module_outside_dist_calls_torch_distributed():
    offenders = {}
    for path in sorted(KD.rglob("*.py")):
        if path == KD / "engine" / "dist.py":
            continue
        uses = _distributed_uses(path)
        if uses:
            offenders[str(path.relative_to(KD.parent))] = uses
    assert offenders == {}, f"use kd.engine.dist instead: {offenders}"


def test_the_scan_finds_direct_collectives(tmp_path):
    # the scanner itself must catch the forms it is there for
    bad = tmp_path / "bad.py"
    bad.write_text("import torch\nimport torch.distributed as td\ntd.all_reduce(x)\ntorch.distributed.barrier()\n")
    assert _distributed_uses(bad) == ["import torch.distributed", "td.all_reduce()", "torch.distributed.barrier()"]


class _Recorded(Exception):
    pass


@pytest.fixture
def fake_world(monkeypatch):
    """A pretend 2-rank group whose accelerator is the meta device; collectives record the device of what they get."""
    seen: list[tuple[str, torch.device]] = []

    def record(name):
        def collective(tensor_or_list, *args, device=None, **kwargs):
            where = device if device is not None else tensor_or_list.device
            seen.append((name, torch.device(where)))
            raise _Recorded  # meta tensors hold no values: stop once the placement is known

        return collective

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "rank", lambda: 0)
    monkeypatch.setattr(dist, "device", lambda: torch.device("meta"))
    for name in ("all_reduce", "broadcast_object_list"):
        monkeypatch.setattr(dist._dist, name, record(name))
    return seen


@pytest.mark.parametrize("call", [
    lambda: dist.all_reduce_sum(torch.ones(3)),
    lambda: dist.all_reduce_max(torch.ones(3, dtype=torch.float64)),
    lambda: dist.sum_values([1.0, 2.0]),
    lambda: dist.any_rank(True),
    lambda: dist.broadcast_object({"plan": 1}),
])
def test_collectives_receive_tensors_on_the_accelerator(fake_world, call):
    with pytest.raises(_Recorded):
        call()
    assert fake_world and all(device == torch.device("meta") for _, device in fake_world), fake_world


def test_results_come_back_on_the_callers_device():
    # one-process world: the helpers return tensors where the caller had them (here the CPU)
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t).device == t.device and dist.all_reduce_sum(t).tolist() == [1.0, 2.0]
    assert dist.sum_values([3.0]) == [3.0] and dist.any_rank(False) is False


# ------------------------------------------------------------------ real 2-process gloo group
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, scenario: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), DS_ACCELERATOR="cpu")
    # join as kd's ranks do (dist.init: deepspeed imported, then init_distributed). A group created before deepspeed
    # is imported outlives destroy_process_group, and at exit a gloo thread still freeing the last collective's
    # tensors can abort the process ("terminate called without an active exception").
    dist.init()
    from kd.errors import UserError

    outcome = "returned"
    try:
        if scenario == "main_raises_user_error":
            def convert():
                raise UserError("converting step_00000002 to a universal checkpoint failed: boom", key="resume")

            dist.run_on_main(convert)
        elif scenario == "main_raises_bug":
            dist.run_on_main(lambda: 1 / 0)
        elif scenario == "main_shares_result":
            outcome = f"returned {dist.run_on_main(lambda: {'tag': 'step_2'}, share_result=True)}"
        elif scenario == "rank1_fails":
            dist.agree_on_errors(RuntimeError("file write failed") if rank == 1 else None)
        elif scenario == "first_block_fails":
            with dist.main_process_first():
                if dist.is_main():
                    raise UserError("data.train.path: no such file")
                outcome = "ran the block"
        dist.barrier()  # every rank is still in lockstep afterwards
    except UserError as e:
        outcome = f"UserError {e}"
    except dist.RemoteError as e:
        outcome = f"RemoteError {e}"
    except ZeroDivisionError as e:
        outcome = f"ZeroDivisionError {e}"
    except RuntimeError as e:
        outcome = "RuntimeError"
    Path(out_dir, f"rank{rank}").write_text(outcome)
    dist.shutdown()  # what kd's ranks do at exit: leave the group together
    # ... and the group's gloo threads are gone before the interpreter exits (one still running there can abort it)
    threads = [Path(t, "comm").read_text().strip() for t in Path("/proc/self/task").iterdir()]
    Path(out_dir, f"rank{rank}.gloo_threads").write_text(str(sum(name.startswith("pt_gloo") for name in threads)))


def _run(scenario: str, tmp_path: Path) -> list[str]:
    mp.spawn(_worker, args=(_free_port(), scenario, str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}.gloo_threads").read_text() for r in range(2)] == ["0", "0"], scenario
    return [(tmp_path / f"rank{r}").read_text() for r in range(2)]


def test_failures_reach_every_rank(tmp_path):
    """One spawn per scenario would cost seconds each; the scenarios run in sequence in fresh 2-process groups."""
    # a UserError on rank 0 (e.g. a universal conversion that failed): every rank raises it, none waits
    r0, r1 = _run("main_raises_user_error", tmp_path)
    assert r0 == r1 == "UserError resume: converting step_00000002 to a universal checkpoint failed: boom"
    # any other exception: rank 0 keeps its own, the others learn what and where
    r0, r1 = _run("main_raises_bug", tmp_path)
    assert r0 == "ZeroDivisionError division by zero"
    assert r1 == "RemoteError ZeroDivisionError on rank 0: division by zero"
    r0, r1 = _run("main_shares_result", tmp_path)
    assert r0 == r1 == "returned {'tag': 'step_2'}"
    # a failure on rank 1 only (a save): rank 1 raises its own, rank 0 learns what and where
    assert _run("rank1_fails", tmp_path) == ["RemoteError RuntimeError on rank 1: file write failed", "RuntimeError"]
    # rank 0's first pass of a main-first block fails: the others do not run it, they raise the same error
    r0, r1 = _run("first_block_fails", tmp_path)
    assert r0 == r1 == "UserError data.train.path: no such file"


# ------------------------------------------------------------------ the end of a rank's process
EXIT_CHILD = r"""
import atexit, sys, threading, time
from pathlib import Path
from kd.engine import dist

out = Path(sys.argv[1])
atexit.register(lambda: out.joinpath("atexit").write_text("ran"))
def late():
    time.sleep(0.3)
    out.joinpath("thread").write_text("joined")
threading.Thread(target=late).start()  # non-daemon: the interpreter would wait for it, so must exit_process
sys.stdout.write("buffered, no newline")
dist.exit_process(3)
out.joinpath("after").write_text("exit_process returned")
"""


def test_exit_process_keeps_what_the_interpreters_exit_does(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", EXIT_CHILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=KD.parent)
    assert run.returncode == 3, run.stderr
    assert run.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    assert not (tmp_path / "after").exists()


RANK_ENTRY_POINTS = ["kd/launch.py", "launchers/train.py", "kd/generation/cli.py", "kd/fusion/generate.py",
                     "kd/compete/launch.py", "kd/store/precompute.py", "tools/bench_step.py"]


@pytest.mark.parametrize("path", RANK_ENTRY_POINTS)
def test_rank_entry_points_end_with_exit_process(path):
    """A process that may hold a DeepSpeed engine ends with dist.exit_process, not sys.exit (see its docstring)."""
    tree = ast.parse((KD.parent / path).read_text())
    main_blocks = [node for node in tree.body if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)]
    assert len(main_blocks) == 1, path
    calls = [ast.unparse(n.func) for n in ast.walk(main_blocks[0]) if isinstance(n, ast.Call)]
    assert "exit_process" in calls and "sys.exit" not in calls, (path, calls)
