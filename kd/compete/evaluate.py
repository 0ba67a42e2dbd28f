"""A student against the teacher on a round's judged instructions, outside a compete run (one process, no launcher):

    python -m kd.compete.evaluate RECIPE --student PATH --scores RUN/compete/round_03/scores.jsonl [--json OUT]

PATH is what `kd eval --student` takes (an exported model, a checkpoints/ directory, a step_* tag). The student
answers the instructions of the scores file (greedy or at compete.answer_temperature, compete.answer_max_new_tokens),
the teacher's answers are the file's, and the recipe's judge scores the pairs with the teacher as its model (or
compete.judge.model), as the discrimination phase does. It is how a plain-distillation student gets the same win rate
as a compete run's student (README "Competitive distillation").
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kd.errors import EXIT_USER_ERROR, UserError


def head_to_head(recipe: Any, student_spec: str, scores_path: str) -> dict[str, Any]:
    from kd.assets import resolve
    from kd.compete.backend import ModelBackend
    from kd.compete.judges import Pair, judge_class, win_rate
    from kd.compete.pool import read_jsonl
    from kd.eval_cli import _load_student, find_student
    from kd.generation import Target
    from kd.models import load_teacher
    from kd.models.vocab import max_positions
    from kd.preflight import load_recipe_tokenizer

    cfg = recipe.compete
    tokenizer = load_recipe_tokenizer(recipe)
    rows = [r for r in read_jsonl(scores_path) if r["teacher_answer"].strip()]
    if not rows:
        raise UserError("holds no instruction with a teacher answer", file=scores_path)
    student = _load_student(find_student(student_spec, recipe.run.output_dir), recipe, tokenizer)
    if cfg.judge.model is not None:
        from kd.compete.models import judge_model_config

        judge_model = load_teacher(judge_model_config(recipe), zero3_config=None, resolve_path=resolve)
    else:
        judge_model = load_teacher(recipe.teacher.model_copy(update={"zero_stage": 0}), zero3_config=None,
                                   resolve_path=resolve)
    vocab = min(len(tokenizer), int(judge_model.config.vocab_size))

    def backend(model):
        return ModelBackend(Target(model), tokenizer, seed=recipe.train.seed, batch_size=cfg.batch_size,
                            max_prompt_tokens=min(max_positions(model.config) or recipe.data.seq_len, 4096),
                            vocab_size=vocab)

    questions = [r["instruction"] for r in rows]
    answers = backend(student).generate(questions, temperature=cfg.answer_temperature, stream=0,
                                        max_new_tokens=cfg.answer_max_new_tokens)
    judge = judge_class(cfg.judge.name)(cfg.judge)
    verdicts = judge.score([Pair(q, r["teacher_answer"], a) for q, r, a in zip(questions, rows, answers)],
                           backend(judge_model))
    judged = [v for v in verdicts if v.ok]
    return {"student": student_spec, "scores": scores_path, "pairs": len(rows), "judged": len(judged),
            "win_rate": win_rate(verdicts),
            "hard_fraction": sum(v.teacher - v.student >= cfg.judge.threshold for v in judged) / max(len(judged), 1),
            "mean_teacher_score": sum(v.teacher for v in judged) / max(len(judged), 1),
            "mean_student_score": sum(v.student for v in judged) / max(len(judged), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kd.compete.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    parser.add_argument("--student", required=True)
    parser.add_argument("--scores", required=True, help="a round's scores.jsonl")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        from kd.preflight import check_recipe

        recipe = check_recipe(args.recipe, args.overrides)
        if recipe.compete is None:
            raise UserError("the recipe has no compete section", key="compete", file=args.recipe)
        result = head_to_head(recipe, args.student, args.scores)
    except UserError as e:
        print(e.report(), file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps(result))
    if args.json:
        from kd.compete.pool import write_jsonl

        write_jsonl(args.json, [result])
    return 0


if __name__ == "__main__":
    sys.exit(main())
