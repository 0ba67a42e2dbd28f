"""Assessors for the discrimination phase: who answered an instruction better, the teacher or the student.

A judge scores a list of `Pair`s through a `backend` (kd.compete.backend.ModelBackend on the engines; a fake in unit
tests) and returns one `Verdict` per pair. Two are built in, and any class with the same shape can be named by
dotted path (`compete.judge.name: mypkg.judges.MyJudge`, constructed with the judge's recipe section):

- ``prompted`` (Lion's referee): a model reads the instruction and both answers and ends its reply with two fixed
  lines, ``Score of Assistant 1: X`` and ``Score of Assistant 2: Y`` (X, Y on the 1-10 scale). Every pair is judged in
  both orders, teacher first (s12) and student first (s21), and averaged so that a bias for the first position
  cancels: teacher = (s12[0] + s21[1]) / 2, student = (s12[1] + s21[0]) / 2. A reply whose closing lines do not parse
  is retried by rule (the same prompt plus a reminder of the format, sampled at ``retry_temperature``, ``retries``
  times); a pair with an order that never parses is counted as failed and left out: it is neither hard nor easy and
  does not enter the win rate. It is never given a number.
- ``likelihood``: the mean log-probability per token of each answer given the instruction under a reference model
  (the teacher unless ``compete.judge.model`` names another). It needs no instruction following, so it is what works
  at the quickstart scale where a 135M model cannot referee. Scale (-inf, 0] nats per token.

An instruction is hard when teacher - student >= ``threshold`` (Lion: 1 point on the 1-10 scale).
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

from kd.errors import UserError


@dataclass(frozen=True)
class Pair:
    instruction: str
    teacher: str  # the teacher's answer
    student: str  # the student's answer


@dataclass(frozen=True)
class Verdict:
    teacher: Optional[float]  # None: left out (failed to parse after retries, or nothing to score)
    student: Optional[float]
    attempts: int = 1  # model calls this pair took (both orders together for the prompted judge)

    @property
    def ok(self) -> bool:
        return self.teacher is not None and self.student is not None


class Backend(Protocol):
    def generate(self, prompts: Sequence[str], *, temperature: float, stream: int, max_new_tokens: int) -> list[str]:
        """The model's reply to each chat prompt (a user turn), identical on every rank."""

    def mean_logprob(self, prompts: Sequence[str], answers: Sequence[str]) -> list[Optional[float]]:
        """Mean log-prob per token of each answer after its chat prompt (None: it cannot be scored)."""


# ---------------------------------------------------------------------------------------------- the prompted judge
JUDGE_PROMPT = """You are a strict and fair reviewer. Below is a question and the answers of two AI assistants.

[Question]
{question}

[Answer of Assistant 1]
{answer_1}
[End of the answer of Assistant 1]

[Answer of Assistant 2]
{answer_2}
[End of the answer of Assistant 2]

Rate how helpful, correct, relevant and detailed each answer is, on a scale from 1 (useless) to 10 (excellent).
The order in which the answers are shown must not affect your judgement. First explain your reasoning in a few
sentences. Then finish your reply with exactly these two lines and nothing after them:
Score of Assistant 1: <a number from 1 to 10>
Score of Assistant 2: <a number from 1 to 10>"""

RETRY_REMINDER = ("\n\nYour previous reply could not be read. Remember: the last two lines must be "
                  "'Score of Assistant 1: <number>' and 'Score of Assistant 2: <number>'.")

_SCORE_LINE = re.compile(r"^\**\s*score of assistant ([12])\s*\**\s*:\s*\**\s*(\d+(?:\.\d+)?)\s*(?:/\s*10)?\s*\**\s*$",
                         re.IGNORECASE)


def judge_prompt(question: str, answer_1: str, answer_2: str) -> str:
    return JUDGE_PROMPT.format(question=question.strip(), answer_1=answer_1.strip(), answer_2=answer_2.strip())


def parse_scores(reply: str, low: float = 1.0, high: float = 10.0) -> Optional[tuple[float, float]]:
    """(score of assistant 1, score of assistant 2) from the reply's last two non-empty lines, in either order; None
    when they are not exactly the two score lines, name the same assistant twice, or a score is outside the scale."""
    lines = [line.strip() for line in reply.strip().splitlines() if line.strip()]
    if len(lines) < 2:
        return None
    found: dict[str, float] = {}
    for line in lines[-2:]:
        m = _SCORE_LINE.match(line)
        if m is None:
            return None
        found[m.group(1)] = float(m.group(2))
    if set(found) != {"1", "2"} or not all(low <= v <= high for v in found.values()):
        return None
    return found["1"], found["2"]


def combine_orders(s12: tuple[float, float], s21: tuple[float, float]) -> tuple[float, float]:
    """(teacher, student) from the teacher-first scores s12 and the student-first scores s21 (Lion's average)."""
    return (s12[0] + s21[1]) / 2.0, (s12[1] + s21[0]) / 2.0


class PromptedJudge:
    scale = (1.0, 10.0)
    needs_same_tokenizer = False  # it reads and writes text

    def __init__(self, cfg: Any = None):
        self.retries = int(getattr(cfg, "retries", 2))
        self.temperature = float(getattr(cfg, "temperature", 0.0))
        self.retry_temperature = float(getattr(cfg, "retry_temperature", 0.7))
        self.max_new_tokens = int(getattr(cfg, "max_new_tokens", 256))
        self.failures = 0  # pairs left out by the last `score` call
        self.retried = 0  # replies that needed a retry in the last call

    def score(self, pairs: Sequence[Pair], backend: Backend, *, stream: int = 0) -> list[Verdict]:
        # prompt 2i: teacher first; 2i+1: student first
        prompts = []
        for p in pairs:
            prompts += [judge_prompt(p.instruction, p.teacher, p.student), judge_prompt(p.instruction, p.student, p.teacher)]
        parsed: list[Optional[tuple[float, float]]] = [None] * len(prompts)
        attempts = [0] * len(prompts)
        pending = list(range(len(prompts)))
        self.retried = 0
        for attempt in range(self.retries + 1):
            if not pending:
                break
            if attempt:
                self.retried += len(pending)
            asked = [prompts[i] + (RETRY_REMINDER if attempt else "") for i in pending]
            replies = backend.generate(asked, temperature=self.temperature if attempt == 0 else self.retry_temperature,
                                       stream=stream * 1000 + attempt, max_new_tokens=self.max_new_tokens)
            still = []
            for i, reply in zip(pending, replies):
                attempts[i] += 1
                parsed[i] = parse_scores(reply, *self.scale)
                if parsed[i] is None:
                    still.append(i)
            pending = still
        out = []
        for k in range(len(pairs)):
            s12, s21 = parsed[2 * k], parsed[2 * k + 1]
            used = attempts[2 * k] + attempts[2 * k + 1]
            if s12 is None or s21 is None:
                out.append(Verdict(None, None, used))
            else:
                out.append(Verdict(*combine_orders(s12, s21), used))
        self.failures = sum(not v.ok for v in out)
        return out


# ---------------------------------------------------------------------------------------------- the likelihood judge
class LikelihoodJudge:
    scale = (-math.inf, 0.0)
    needs_same_tokenizer = True  # log-probs of the recipe's tokens: the reference model must share the vocabulary

    def __init__(self, cfg: Any = None):
        self.failures = 0
        self.retried = 0

    def score(self, pairs: Sequence[Pair], backend: Backend, *, stream: int = 0) -> list[Verdict]:
        prompts = [p.instruction for p in pairs]
        values = backend.mean_logprob(prompts * 2, [p.teacher for p in pairs] + [p.student for p in pairs])
        n = len(pairs)
        out = [Verdict(t, s) if t is not None and s is not None else Verdict(None, None)
               for t, s in zip(values[:n], values[n:])]
        self.failures = sum(not v.ok for v in out)
        return out


BUILTIN = {"prompted": PromptedJudge, "likelihood": LikelihoodJudge}


def judge_class(name: str, *, key: str = "compete.judge.name") -> type:
    """The judge class for a built-in name or a dotted path `pkg.module.Class`."""
    if name in BUILTIN:
        return BUILTIN[name]
    if "." not in name:
        import difflib

        close = difflib.get_close_matches(name, list(BUILTIN), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown judge {name!r}{hint}; use one of {', '.join(BUILTIN)} or a dotted path "
                        "pkg.module.Class", key=key)
    module, _, attr = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import judge {name!r}: {e}", key=key) from None
    if not callable(getattr(cls, "score", None)) or not hasattr(cls, "scale"):
        raise UserError(f"{name!r} is not a judge: it needs a `scale` (low, high) and a `score(pairs, backend)` "
                        "method (see kd.compete.judges)", key=key)
    return cls


def check_threshold(cls: type, threshold: float, *, key: str = "compete.judge.threshold") -> None:
    """A hard-instruction threshold must be a score gap the judge's scale can produce: 0 < gap <= high - low."""
    low, high = cls.scale
    span = high - low
    if not (0 < threshold <= span):
        raise UserError(f"threshold {threshold} is outside the {cls.__name__} score scale [{low}, {high}]: a gap "
                        f"teacher - student must be > 0 and <= {span}", key=key)


def is_hard(v: Verdict, threshold: float) -> bool:
    return v.ok and v.teacher - v.student >= threshold


def win_rate(verdicts: Sequence[Verdict]) -> Optional[float]:
    """Fraction of judged pairs the student won (a tie counts half); None when no pair was judged."""
    judged = [v for v in verdicts if v.ok]
    if not judged:
        return None
    return sum(1.0 if v.student > v.teacher else 0.5 if v.student == v.teacher else 0.0 for v in judged) / len(judged)
