"""`kd train | validate | eval | generate | fuse-generate | export`: parse arguments, then call into the package.

`kd train` validates the recipe, prepares packaged assets once (so ranks never race to download), and then starts the
real `deepspeed` launcher with launchers/train.py on each rank: the same path a GPU cluster uses.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys

from kd.errors import EXIT_USER_ERROR, UserError


def main(argv: list[str] | None = None) -> int:
    _quiet_accelerator_detection()
    parser = argparse.ArgumentParser(prog="kd", description="Distributed knowledge distillation on DeepSpeed.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train a recipe with the deepspeed launcher")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: run.nproc)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p = sub.add_parser("validate", help="check a recipe without training")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p = sub.add_parser("eval", help="evaluate a student against the teacher on held-out data (one process)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--student", default=None, help="exported model dir, checkpoints dir or step_* tag "
                   "(default: the newest checkpoint of run.output_dir)")
    p.add_argument("--untrained", action="store_true", help="evaluate the student as the recipe builds it (baseline)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the metrics to this JSON file")
    p.add_argument("--max-batches", type=int, default=None, metavar="N", help="evaluate at most N micro-batches")
    p.add_argument("--split", choices=["eval", "train"], default="eval", help="data split to evaluate on")
    p = sub.add_parser("generate", help="completions for a JSON-lines file of prompts (student, teacher or a model)")
    from kd.generation.cli import add_arguments as add_generate_arguments

    add_generate_arguments(p)
    p = sub.add_parser("fuse-generate", help="completions of a recipe's fusion (teacher.fusion): a* solved per step")
    from kd.fusion.generate import add_arguments as add_fuse_generate_arguments

    add_fuse_generate_arguments(p)
    p = sub.add_parser("precompute", help="run the teacher once and store its top-k signal (train from it with "
                       "teacher.store)")
    from kd.store.precompute import add_arguments as add_precompute_arguments

    add_precompute_arguments(p)
    p = sub.add_parser("compete", help="competitive distillation rounds (imitation, discrimination, generation)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value")
    p.add_argument("--nproc", type=int, default=None, help="processes on this machine (default: run.nproc)")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: a free one)")
    p = sub.add_parser("export", help="write a Hugging Face model from a checkpoint directory")
    p.add_argument("checkpoints")
    p.add_argument("out_dir")
    p.add_argument("--tag", default=None)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None)
    # overrides may come before or after --flags (`kd train r.yaml --nproc 2 train.max_steps=6`)
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if "=" not in a or a.startswith("-")]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "validate":
            return validate(args.recipe, args.overrides)
        if args.command == "train":
            return train(args.recipe, args.overrides, nproc=args.nproc, master_port=args.master_port)
        if args.command == "compete":
            from kd.compete.cli import run as compete

            return compete(args.recipe, args.overrides, nproc=args.nproc, master_port=args.master_port)
        if args.command == "eval":
            from kd.eval_cli import run

            run(args.recipe, args.overrides, student=args.student, untrained=args.untrained, json_out=args.json,
                max_batches=args.max_batches, split=args.split)
            return 0
        if args.command == "generate":
            from kd.generation.cli import run as generate

            return generate(args)
        if args.command == "fuse-generate":
            from kd.fusion.generate import run as fuse_generate

            return fuse_generate(args)
        if args.command == "precompute":
            from kd.store.precompute import run as precompute

            return precompute(args)
        if args.command == "export":
            from kd.export import export

            export(args.checkpoints, args.out_dir, tag=args.tag, dtype=args.dtype)
            return 0
    except UserError as e:
        if e.file is None and e.key is not None and getattr(args, "recipe", None):
            e.file = args.recipe
        print(e.report(), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _quiet_accelerator_detection() -> None:
    """Without a GPU, tell DeepSpeed up front that it runs on the CPU: otherwise this process and every rank it starts
    print a warning that it could not find one. (A user's own DS_ACCELERATOR setting wins.)"""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def validate(recipe_path: str, overrides: list[str]) -> int:
    from kd.preflight import check_models, check_recipe

    recipe = check_recipe(recipe_path, overrides)
    check_models(recipe)
    print(f"{recipe_path}: ok ({recipe.loss.name}, {recipe.train.max_steps or recipe.train.epochs} "
          f"{'steps' if recipe.train.max_steps else 'epochs'}, student ZeRO-{recipe.student.zero_stage}, "
          f"teacher ZeRO-{recipe.teacher.zero_stage})")
    return 0


def train(recipe_path: str, overrides: list[str], *, nproc: int | None, master_port: int | None) -> int:
    from kd.preflight import check_models, check_recipe, prepare_assets, prepare_data

    recipe = check_recipe(recipe_path, overrides)
    nproc = nproc or recipe.run.nproc
    check_capacity(nproc)
    if master_port is not None and not _port_free(master_port):
        raise UserError(f"port {master_port} is already in use on this machine; pass another --master-port or leave "
                        "it out (kd then picks a free one)")
    prepare_assets(recipe)
    prepare_data(recipe, check_models(recipe))
    port = master_port or _free_port()
    cmd = local_launch_command(nproc, port, ["--recipe", recipe_path, *overrides])
    print(f"kd: launching {nproc} process(es): deepspeed --num_gpus {nproc} launchers/train.py --recipe {recipe_path}"
          + "".join(f" {o}" for o in overrides), file=sys.stderr, flush=True)
    return run_launcher(cmd, port)


def launch_ranks(nproc: int, script_args: list[str], *, module: str = "kd.launch") -> int:
    """Start `nproc` local ranks of `module` (a per-rank entry like kd.launch) on the deepspeed launcher; their
    exit code. For the commands besides `kd train` that run on ranks (generate, precompute, ...)."""
    check_capacity(nproc)
    port = _free_port()
    cmd = local_launch_command(nproc, port, script_args)
    cmd[cmd.index("kd.launch")] = module
    return run_launcher(cmd, port)


def run_launcher(cmd: list[str], port: int) -> int:
    """Run the launcher to its end. Ctrl-C reaches the launcher and every rank too (one process group): the ranks
    stop at the end of their step and save, so this process keeps waiting instead of killing the launcher, which
    would orphan ranks in the middle of a checkpoint. A second Ctrl-C asks the launcher to stop them, a third kills."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    interrupts = 0
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts == 1:
                    print("kd: interrupted: the ranks finish their step, save and exit; waiting for them (Ctrl-C "
                          "again to stop them without waiting)", file=sys.stderr, flush=True)
                elif interrupts == 2:
                    proc.terminate()
                else:
                    proc.kill()
    finally:
        remove_shm_buffers(port)


def remove_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU all-reduce keeps per-rank buffers in /dev/shm named after the rendezvous port and never removes
    them (nor can it, when a rank is killed); left alone they fill the machine's shared memory run after run."""
    import glob

    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*"):
        try:
            os.remove(path)
        except OSError:
            pass


def local_launch_command(nproc: int, port: int, script_args: list[str]) -> list[str]:
    """DeepSpeed's per-node launcher (deepspeed.launcher.launch) for N local ranks running kd.launch.

    This is exactly what `deepspeed --num_gpus N` runs on a single node, minus the intermediate `deepspeed` runner
    process, whose only job there is to compute this world description (it saves a Python start-up per run).
    """
    # ranks go to the first N visible GPUs (launch.py sets CUDA_VISIBLE_DEVICES from this list; ignored on CPU)
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip().isdigit()]
    devices = [int(d) for d in visible[:nproc]] if len(visible) >= nproc else list(range(nproc))
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": devices}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
            "--master_addr=127.0.0.1", f"--master_port={port}", "--log_level=warning", "--module", "kd.launch",
            *script_args]


def check_capacity(nproc: int) -> None:
    """One process per GPU, or on a CPU-only machine at most one per core: more ranks than that would oversubscribe
    the devices (DeepSpeed maps ranks to GPUs by local rank), so it is refused before anything starts."""
    import torch

    if torch.cuda.is_available():
        have, what = torch.cuda.device_count(), "GPU(s)"
    else:
        have, what = os.cpu_count() or 1, "CPU core(s) and no GPU"
    if nproc > have:
        raise UserError(f"asks for {nproc} processes but this machine has {have} {what}; lower run.nproc or --nproc",
                        key="run.nproc")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
