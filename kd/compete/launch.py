"""Per-rank entry of `kd compete` (`python -m deepspeed.launcher.launch ... --module kd.compete.launch --recipe R`).
Exit codes as kd.launch: 0 done (or stopped on a signal with everything saved), 2 bad input, 3 the run failed."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from kd.errors import EXIT_USER_ERROR, UserError

EXIT_RUN_FAILED = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="kd compete process (one per rank)")
    parser.add_argument("--recipe", required=True)
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed.c10d_logger")
    main_rank = os.environ.get("RANK", "0") == "0"
    from kd.engine import dist

    try:
        from kd.checkpoint import CheckpointWriteError
        from kd.compete.rounds import CompeteRun, Stopped
        from kd.config import load_recipe
        from kd.engine.dist import RemoteError
        from kd.trainer import LossContractError, TrainingDiverged

        recipe = load_recipe(args.recipe, args.overrides)
        try:
            CompeteRun(recipe).run()
        except Stopped as e:
            if main_rank:
                print(f"kd compete: {e}; run the same command again to resume", file=sys.stderr, flush=True)
        except (TrainingDiverged, CheckpointWriteError, LossContractError, RemoteError) as e:
            if main_rank:
                print(f"kd: error: {e}", file=sys.stderr, flush=True)
            return EXIT_RUN_FAILED
    except UserError as e:
        if e.file is None and e.key is not None:
            e.file = args.recipe
        if main_rank:
            print(e.report(), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    dist.shutdown()
    return 0


if __name__ == "__main__":
    from kd.engine.dist import exit_process

    exit_process(main())  # a rank's process ends without the interpreter's teardown (see exit_process)
