"""The only place in kd that talks to torch.distributed (gloo on CPU, nccl on GPU, as DeepSpeed set it up).

Two rules live here so that no caller has to remember them (tests/unit/engine/test_dist.py keeps them):

- **Device placement.** NCCL rejects CPU tensors, gloo accepts them, so a CPU test never catches a CPU tensor handed
  to a collective. Every helper moves its input to `device()` before the collective and gives the result back on the
  caller's device (or as Python values), so callers pass whatever they have.
- **Failures every rank agrees on.** Work that one rank does while the others wait (rank 0 converting a checkpoint,
  writing a manifest, tokenizing into the cache) must not leave the others in a barrier when it raises:
  `run_on_main` hands rank 0's outcome, result or error, to every rank, and `agree_on_errors` lets ranks that each
  may have failed decide together. Every rank then raises the same error and exits with the same message.

Everything here also works without an initialised process group (a world of one), so library code and unit tests
can call it freely. With a group, collectives run even for a world of one: a 1-GPU run then exercises NCCL's device
rules too.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, NoReturn, Optional, Sequence, TypeVar

import torch
import torch.distributed as _dist

T = TypeVar("T")


def init() -> None:
    """Join the process group the launcher described in the environment (RANK, WORLD_SIZE, MASTER_ADDR, ...)."""
    if is_initialized():
        return
    import deepspeed

    # A single process started without a launcher still gets a (one-rank) group, so the same code path runs.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    deepspeed.init_distributed()
    if device().type == "cuda":
        # object collectives and NCCL barriers use the current device; without this every rank would pick cuda:0
        torch.cuda.set_device(device())


def shutdown() -> None:
    """Leave the process group (every rank together). Best effort: the process is about to exit either way.

    The barrier first matters: gloo sends in background threads, so a rank that tears its group down while a peer
    is still receiving its last broadcast can abort ("terminate called without an active exception", exit -6).
    Meant for where every rank arrives (success, or an error all ranks agreed on); the wait is bounded all the
    same, so a rank whose peers never come exits anyway and the launcher stops the rest.

    This does not make the exit itself safe: DeepSpeed keeps its engines, and with them their process groups, alive
    to the end of the process (measured, torch 2.13 / deepspeed 0.19: four gloo threads survive `del engine`,
    gc.collect() and this function), and so does a group created before deepspeed was imported. A gloo thread still
    releasing the last collective's tensors when the interpreter tears down needs the GIL there and aborts the
    process. Rank entry points therefore end with `exit_process`.
    """
    if is_initialized():
        try:
            from datetime import timedelta

            kwargs = {"device_ids": [device().index]} if device().type == "cuda" else {}
            _dist.barrier(async_op=True, **kwargs).wait(timeout=timedelta(seconds=60))
            _dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - nothing useful to report at exit
            pass


def exit_process(code: Optional[int]) -> NoReturn:
    """End a rank's process with exit status ``code`` (None: 0) without the interpreter's teardown, as
    multiprocessing ends its workers: join the non-daemon threads, run the atexit handlers (logging, TensorBoard,
    temporary files) while the interpreter is fully alive, flush stdout and stderr, then `os._exit`.

    The teardown is where a background C++ thread that still holds Python tensors (gloo's, measured here; NCCL's
    watchdog thread is of the same kind) crashes the process (see `shutdown`), after everything was saved and
    reported. Call it last, from `__main__`.
    """
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # noqa: SLF001 - the same call the interpreter makes at exit
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed or replaced streams: nothing left to flush
            pass
    os._exit(code or 0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_initialized() -> bool:
    return _dist.is_available() and _dist.is_initialized()


def rank() -> int:
    return _dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return _dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    """This rank's accelerator device as DeepSpeed sees it (cpu when there is no GPU)."""
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    return torch.device(name, local_rank()) if name != "cpu" else torch.device("cpu")


def synchronize() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


# ---------------------------------------------------------------------------------------------- tensor collectives
def barrier() -> None:
    if is_initialized():
        # NCCL's barrier guesses a device from the rank when none is given; name ours so it never picks another GPU's
        _dist.barrier(device_ids=[device().index]) if device().type == "cuda" else _dist.barrier()


def _reduce(tensor: torch.Tensor, op) -> torch.Tensor:
    """All-reduce a copy of `tensor` on the accelerator; the result comes back on `tensor`'s own device."""
    if not is_initialized():
        return tensor
    work = tensor.to(device())
    _dist.all_reduce(work, op=op)
    return work if work.device == tensor.device else work.to(tensor.device)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over ranks, on `tensor`'s device (a new tensor when it had to move; do not rely on
    in-place updates)."""
    return _reduce(tensor, _dist.ReduceOp.SUM)


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    return _reduce(tensor, _dist.ReduceOp.MAX)


def sum_values(values: Sequence[float]) -> list[float]:
    """Python numbers summed over ranks (float64 on the accelerator, one collective)."""
    return all_reduce_sum(torch.tensor(list(values), dtype=torch.float64, device=device())).tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is True on at least one (one collective)."""
    return bool(all_reduce_max(torch.tensor([1.0 if flag else 0.0], device=device()))[0] > 0)


# ---------------------------------------------------------------------------------------------- object collectives
def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (pickled; small objects only: messages, plans, names)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    _dist.broadcast_object_list(box, src=src, device=device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    # all_gather_object serializes onto the current device; init() made that this rank's device on GPUs
    _dist.all_gather_object(out, obj)
    return out


# ---------------------------------------------------------------------------------------------- agreed failures
class RemoteError(Exception):
    """An error raised on another rank (or on this one), re-raised identically on every rank.

    ``kind`` is the original exception's class name; entry points treat a remote `UserError` like a local one (exit 2)
    and anything else as a failed run. ``message`` is what the failing rank's exception said.
    """

    def __init__(self, message: str, *, kind: str, origin_rank: int):
        super().__init__(message)
        self.message, self.kind, self.origin_rank = message, kind, origin_rank

    def __str__(self) -> str:
        return f"{self.kind} on rank {self.origin_rank}: {self.message}"


def _describe(error: BaseException) -> dict[str, Any]:
    from kd.errors import UserError

    if isinstance(error, UserError):
        return {"kind": "UserError", "message": error.message, "key": error.key, "file": error.file}
    return {"kind": type(error).__name__, "message": str(error) or type(error).__name__, "key": None, "file": None}


def _raise_agreed(described: dict[str, Any], origin_rank: int) -> None:
    from kd.errors import UserError

    if described["kind"] == "UserError":  # a mistake in the input: every rank reports it as one
        raise UserError(described["message"], key=described["key"], file=described["file"])
    raise RemoteError(described["message"], kind=described["kind"], origin_rank=origin_rank)


def run_on_main(fn: Callable[[], T], *, share_result: bool = False) -> Optional[T]:
    """Run `fn` on rank 0 while the others wait; if it raises, every rank raises: rank 0 its own exception (with its
    traceback, when it is a bug), the others the same `UserError`, or a `RemoteError` naming what rank 0 raised.

    The outcome travels by one broadcast, which the waiting ranks are already in, so a failure on rank 0 can never
    strand them in a barrier. With ``share_result`` every rank receives rank 0's return value (it must pickle).
    """
    if is_main():
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - every kind must reach the other ranks, not just UserError
            broadcast_object({"ok": False, "error": _describe(e)})
            raise
        broadcast_object({"ok": True, "value": value if share_result else None})
        return value
    outcome = broadcast_object(None)
    if not outcome["ok"]:
        _raise_agreed(outcome["error"], origin_rank=0)
    return outcome["value"]


def agree_on_errors(error: Optional[BaseException]) -> None:
    """Collective: each rank passes what it caught (or None); if any rank failed, every rank raises: a failing rank
    its own exception, the others the error of the lowest failing rank, naming that rank. Use after work that every
    rank did and that any of them may have failed."""
    everyone = all_gather_object(_describe(error) if error is not None else None)
    if error is not None:
        raise error
    for origin, found in enumerate(everyone):
        if found is not None:
            _raise_agreed(found, origin_rank=origin)


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (e.g. tokenizes and fills the datasets cache), then the others (cache hits). If the
    block raises on rank 0, the others raise the same error instead of running it."""
    if is_main():
        try:
            yield
        except Exception as e:  # noqa: BLE001
            broadcast_object(_describe(e))
            raise
        broadcast_object(None)
    else:
        outcome = broadcast_object(None)
        if outcome is not None:
            _raise_agreed(outcome, origin_rank=0)
        yield
