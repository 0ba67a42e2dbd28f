"""build_loss: every built-in name, dotted paths to user classes, and the UserErrors for bad input."""
from __future__ import annotations

import textwrap

import pytest
import torch

from kd.config.schema import LossConfig
from kd.errors import UserError
from kd.losses import CrossEntropyLoss, DistillationLoss, DivergenceLoss, LossInputs, build_loss
from kd.losses import functional as F


@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"])
def test_builtin_divergences(name):
    cfg = LossConfig(name=name, temperature=2.0, ce_weight=0.0, beta=0.3, alpha=0.4)
    loss = build_loss(cfg)
    assert isinstance(loss, DivergenceLoss)
    assert loss.temperature == 2.0 and loss.ce_weight == 0.0
    expected_kwargs = {"jsd": {"beta": 0.3}, "skew_kl": {"alpha": 0.4}, "skew_reverse_kl": {"alpha": 0.4}}
    assert loss.divergence_kwargs == expected_kwargs.get(name, {})
    # The built loss computes the named divergence with the section's knobs.
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    labels = torch.zeros(2, 3, dtype=torch.long)
    direct = getattr(F, name)(s, t, temperature=2.0, **expected_kwargs.get(name, {})).sum()
    torch.testing.assert_close(loss(LossInputs(s, t, labels)).loss_sum, direct)


def test_ce_builds_plain_cross_entropy_and_ignores_kd_knobs():
    loss = build_loss(LossConfig(name="ce", temperature=3.0, ce_weight=0.5))
    assert isinstance(loss, CrossEntropyLoss) and loss.needs_teacher is False


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(name="forward_kll"))
    assert err.value.key == "loss.name"
    for name in ("forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "ce"):
        assert name in err.value.message


def test_options_on_builtin_rejected():
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(name="jsd", options={"beta": 0.2}))
    assert err.value.key == "loss.options" and "beta" in err.value.message


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    """A user package on sys.path with a custom loss, a non-loss class and a module that fails to import."""
    (tmp_path / "my_losses.py").write_text(textwrap.dedent('''
        import torch
        from kd.losses import DistillationLoss, LossOutput

        class ScaledCE(DistillationLoss):
            needs_teacher = False

            def __init__(self, cfg, scale=1.0):
                super().__init__()
                self.cfg = cfg
                self.scale = scale

            def forward(self, inputs):
                n = (inputs.labels != -100).sum()
                return LossOutput(loss_sum=self.scale * n.float(), num_tokens=n, terms={})

        class NotALoss:
            def __init__(self, cfg):
                pass
    '''))
    (tmp_path / "broken_losses.py").write_text("import a_module_that_does_not_exist_kd\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_losses"


def test_dotted_path_builds_class_with_cfg_and_options(user_module):
    cfg = LossConfig(name=f"{user_module}.ScaledCE", temperature=1.5, options={"scale": 3.0})
    loss = build_loss(cfg)
    assert isinstance(loss, DistillationLoss) and type(loss).__name__ == "ScaledCE"
    assert loss.cfg is cfg and loss.scale == 3.0
    labels = torch.tensor([[1, -100, 2]])
    assert float(loss(LossInputs(torch.zeros(1, 3, 4), None, labels)).loss_sum) == 6.0


@pytest.mark.parametrize("path,fragment", [
    ("no_such_pkg_kd.mod.Loss", "no_such_pkg_kd.mod"),
    ("broken_losses.Loss", "broken_losses"),
    ("my_losses.Missing", "Missing"),
    ("my_losses.NotALoss", "DistillationLoss"),
])
def test_bad_dotted_path(user_module, path, fragment):
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(name=path))
    assert err.value.key == "loss.name"
    assert fragment in err.value.message


def test_options_that_do_not_fit_the_class(user_module):
    with pytest.raises(UserError) as err:
        build_loss(LossConfig(name=f"{user_module}.ScaledCE", options={"scael": 2.0}))
    assert err.value.key == "loss.options" and "scael" in err.value.message


@pytest.mark.parametrize("section", [
    {"name": "forward_kl"}, {"name": "jsd", "beta": 0.3, "ce_weight": 0.2}, {"name": "ce"},
    {"name": "taid"}, {"name": "taid", "ce_weight": 0.5},
    {"name": "forward_kl", "ce_weight": 0.1, "trg": {"layers": "final", "local_weight": 0.0}},
])
def test_declared_term_names_are_the_terms_returned(section):
    """Issue 10 item 8: a built-in loss fixes its logging terms when built; every micro-batch returns exactly them."""
    import torch

    from kd.config.schema import LossConfig
    from kd.losses import LossContext, LossInputs, build_loss

    loss = build_loss(LossConfig.model_validate(section), LossContext(
        total_steps=4, student_hidden_size=8, teacher_hidden_size=8, student_num_layers=2, teacher_num_layers=2))
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[0, :2] = -100
    hidden = tuple(torch.randn(2, 5, 8, generator=g) for _ in range(len(loss.student_hidden_layers or ())))
    inputs = LossInputs(torch.randn(2, 5, 11, generator=g, requires_grad=True), torch.randn(2, 5, 11, generator=g),
                        labels, student_hidden=hidden or None, teacher_hidden=hidden or None, step=1)
    assert tuple(loss(inputs).terms) == loss.term_names()
