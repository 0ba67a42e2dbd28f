"""The lockstep contract of losses (issue 10 item 8): the step runner holds every micro-batch to the term names the
loss declares, and a loss that declares none to its first micro-batch's."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from kd.engine.step import LossContractError, StepRunner


class _Loss:
    def __init__(self, declared):
        self.declared = declared

    def term_names(self):
        return self.declared


def _runner(declared):
    runner = StepRunner.__new__(StepRunner)  # the checks need only the loss, not an engine
    runner.module = SimpleNamespace(loss=_Loss(declared))
    runner.term_names = None
    return runner


def test_terms_are_held_to_the_declaration():
    runner = _runner(("kd", "ce"))
    one = torch.ones(())
    runner.term_names = runner._agree_on_term_names(("kd",))  # the declaration wins over what was observed
    assert runner.term_names == ("kd", "ce")
    assert runner._checked_terms({"kd": one, "ce": one}, 1) == ["kd", "ce"]
    with pytest.raises(LossContractError, match=r"returned terms \['kd'\] at step 3, but its terms are \['kd', 'ce'\]"):
        runner._checked_terms({"kd": one}, 3)
    with pytest.raises(LossContractError) as info:
        runner._checked_terms({"ce": one, "kd": one}, 4)  # the order matters too: they are stacked by position
    assert info.value.local  # only this rank knows: it reports the error itself


def test_an_undeclared_loss_is_held_to_its_first_micro_batch():
    runner = _runner(None)
    one = torch.ones(())
    runner.term_names = runner._agree_on_term_names(("kd",))
    with pytest.raises(LossContractError, match="'surprise'"):
        runner._checked_terms({"kd": one, "surprise": one}, 2)
