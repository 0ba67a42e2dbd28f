"""`kd compete RECIPE [key=value ...] [--nproc N] [--master-port P]`: check the recipe's compete section, the judge,
the seed pool and the models in this process (one-line errors, nothing started), then launch the ranks."""
from __future__ import annotations

import sys

from kd.errors import UserError


def check(recipe_path: str, overrides: list[str]):
    """Every check a user can fix before a rank starts; returns the recipe."""
    from kd.compete.models import check_judge, load_seeds
    from kd.preflight import check_models, check_recipe, prepare_assets

    recipe = check_recipe(recipe_path, overrides)
    if recipe.compete is None:
        raise UserError("the recipe has no compete section; add one (see recipes/compete_quickstart.yaml) or use "
                        "kd train", key="compete")
    cfg = recipe.compete
    room = recipe.data.seq_len
    if cfg.answer_max_new_tokens >= room:
        raise UserError(f"answer_max_new_tokens ({cfg.answer_max_new_tokens}) leaves no room for an instruction "
                        f"inside data.seq_len ({room}); lower it or raise data.seq_len", key="compete.answer_max_new_tokens")
    if cfg.teacher_steps and (recipe.teacher.path is None or recipe.teacher.fusion is not None):
        raise UserError("the teacher phase trains the teacher as a model of its own: it needs teacher.path (a model "
                        "directory, not an inline config or a fusion); or set compete.teacher_steps: 0",
                        key="compete.teacher_steps")
    prepare_assets(recipe)
    if cfg.judge.model is not None and cfg.judge.model.path and cfg.judge.model.path.startswith("asset:"):
        from kd.assets import resolve

        resolve(cfg.judge.model.path)
    tokenizer = check_models(recipe)
    if tokenizer.eos_token_id is None:
        raise UserError("competitive distillation generates answers and needs a tokenizer with an EOS token",
                        key="tokenizer" if recipe.tokenizer else "teacher.path")
    check_judge(recipe, tokenizer)
    load_seeds(recipe)
    return recipe


def run(recipe_path: str, overrides: list[str], *, nproc: int | None, master_port: int | None) -> int:
    from kd.cli import _free_port, _port_free, check_capacity, local_launch_command, run_launcher

    recipe = check(recipe_path, overrides)
    nproc = nproc or recipe.run.nproc
    check_capacity(nproc)
    if master_port is not None and not _port_free(master_port):
        raise UserError(f"port {master_port} is already in use on this machine; pass another --master-port")
    port = master_port or _free_port()
    cmd = local_launch_command(nproc, port, ["--recipe", recipe_path, *overrides])
    cmd[cmd.index("kd.launch")] = "kd.compete.launch"  # the same per-rank launch as `kd train`, another entry
    print(f"kd: launching {nproc} process(es) of kd compete {recipe_path}" + "".join(f" {o}" for o in overrides),
          file=sys.stderr, flush=True)
    return run_launcher(cmd, port)  # Ctrl-C: waits while the ranks save (kd.cli.run_launcher)
