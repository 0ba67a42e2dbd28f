"""Per-rank entry point: what `deepspeed [...] launchers/train.py --recipe R [key=value ...]` (or
`deepspeed --module kd.launch ...`, which `kd train` uses) runs on every rank.

The launcher (deepspeed, accelerate, torchrun, slurm) sets RANK/WORLD_SIZE/MASTER_ADDR/...; this script reads the
recipe and trains. Bad input exits with code 2 and one line on stderr (printed by rank 0 only).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from kd.config import load_recipe
from kd.errors import EXIT_USER_ERROR, UserError

EXIT_RUN_FAILED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kd training process (one per rank)")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    # DeepSpeed's own calls into deprecated torch.distributed names warn once per rank; not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    code, local = _run(args)
    if not local:
        # Every rank got here together (success, or an error they agreed on): leave the process group cleanly.
        # Left to interpreter exit, gloo's threads can abort the process ("terminate called without an active
        # exception", exit -6) after the one-line message was printed. A rank that failed alone skips this: its
        # peers are not there to agree, and the launcher stops them.
        from kd.engine import dist

        dist.shutdown()
    return code


def _run(args: argparse.Namespace) -> tuple[int, bool]:
    """(exit code, whether the failure was this rank's alone)."""
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        from kd.checkpoint import CheckpointWriteError
        from kd.engine.dist import RemoteError
        from kd.trainer import LossContractError, Trainer, TrainingDiverged

        try:
            Trainer(recipe).train()
        except (TrainingDiverged, CheckpointWriteError, LossContractError, RemoteError) as e:
            # the run itself failed (not the input): one line, a distinct exit code, nothing half-written. These are
            # agreed on by every rank (the same error everywhere), so rank 0 alone reports them, unless only this
            # rank knows (`local`); the launcher then stops the others.
            local = bool(getattr(e, "local", False))
            if os.environ.get("RANK", "0") == "0" or local:
                print(f"kd: error: {e}", file=sys.stderr, flush=True)
            return EXIT_RUN_FAILED, local
    except UserError as e:
        if e.file is None and e.key is not None:
            e.file = args.recipe
        if os.environ.get("RANK", "0") == "0":
            print(e.report(), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR, False
    return 0, False


if __name__ == "__main__":
    from kd.engine.dist import exit_process

    exit_process(main())  # a rank's process ends without the interpreter's teardown (see exit_process)
