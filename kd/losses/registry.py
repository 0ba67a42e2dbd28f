"""Build the loss a recipe's ``loss:`` section names.

``loss.name`` is one of

- a built-in divergence: forward_kl, reverse_kl, jsd (uses ``loss.beta``), tvd, skew_kl / skew_reverse_kl (use
  ``loss.alpha``), each mixed with CE by ``loss.ce_weight`` at ``loss.temperature``;
- ``ce``: plain cross-entropy fine-tuning (no teacher; temperature, ce_weight, beta, alpha are ignored, so a KD
  recipe can be turned into its baseline with the single override ``loss.name=ce``);
- a built-in class loss from `CLASS_LOSSES` (methods with their own knobs, e.g. TAID), built like a dotted path;
- a dotted path ``pkg.module.ClassName`` to a `DistillationLoss` subclass, constructed as
  ``ClassName(cfg, **cfg.options)`` where ``cfg`` is the whole `LossConfig` section (so the class can read
  temperature, ce_weight, ...) and ``loss.options`` holds its extra keyword arguments.

``loss.options`` is only for class losses: a built-in divergence or ce has no options, and silently ignoring them
would hide a typo or a misunderstanding, so it is an error.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from kd.config.schema import LossConfig
from kd.errors import UserError
from kd.losses.base import DistillationLoss, LossContext
from kd.losses.divergence import CrossEntropyLoss, DivergenceLoss
from kd.losses.functional import DIVERGENCES


def _divergence_factory(name: str) -> Callable[[LossConfig], DistillationLoss]:
    """A builder for the built-in divergence ``name`` that picks its own knob (beta or alpha) from the section."""
    knobs = [k for k in ("beta", "alpha") if k in inspect.signature(DIVERGENCES[name]).parameters]

    def build(cfg: LossConfig) -> DistillationLoss:
        return DivergenceLoss(name, temperature=cfg.temperature, ce_weight=cfg.ce_weight, kernel=cfg.kernel,
                              sparse_tail=cfg.sparse_tail, **{k: getattr(cfg, k) for k in knobs})

    return build


# Built-ins that take no options: name -> builder from the LossConfig section.
SIMPLE_LOSSES: dict[str, Callable[[LossConfig], DistillationLoss]] = {
    **{name: _divergence_factory(name) for name in DIVERGENCES},
    "ce": lambda cfg: CrossEntropyLoss(),
}

# Built-in short names for class losses, which take ``loss.options``: name -> dotted path, imported only when used
# (so a heavy method costs nothing to runs that do not pick it). Methods living in kd.losses register here.
CLASS_LOSSES: dict[str, str] = {
    "taid": "kd.losses.taid.TAIDLoss",
}


def valid_names() -> list[str]:
    """Every short name ``loss.name`` accepts (dotted paths aside)."""
    return [*SIMPLE_LOSSES, *CLASS_LOSSES]


def _import_class(path: str) -> type:
    """Import ``pkg.module.ClassName``; any failure becomes a UserError naming the path."""
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise UserError(f"{path!r} is not a dotted path `pkg.module.ClassName`", key="loss.name")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module may fail in any way while importing; report it as their input
        raise UserError(f"cannot import module {module_name!r} for loss {path!r}: {type(exc).__name__}: {exc}. "
                        "Check the path and that the package is importable (installed or on PYTHONPATH).",
                        key="loss.name") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise UserError(f"module {module_name!r} has no attribute {attr!r} (loss {path!r})", key="loss.name") from None


def _build_class_loss(path: str, cfg: LossConfig, context: LossContext) -> DistillationLoss:
    """Construct ``Class(cfg, **cfg.options)`` after checking it is a DistillationLoss and the options fit.

    A class whose constructor has a ``context`` keyword also receives the run's `LossContext`."""
    cls = _import_class(path)
    if not (isinstance(cls, type) and issubclass(cls, DistillationLoss)):
        raise UserError(f"{path!r} is not a subclass of kd.losses.DistillationLoss", key="loss.name")
    extra = {"context": context} if "context" in inspect.signature(cls).parameters else {}
    try:
        # Bind first, so that only a mismatch between options and the signature is reported as a user error; a
        # TypeError raised inside the constructor is a bug in that class and keeps its traceback.
        inspect.signature(cls).bind(cfg, **cfg.options, **extra)
    except TypeError as exc:
        raise UserError(f"options do not fit {cls.__name__}{inspect.signature(cls)}: {exc}",
                        key="loss.options") from None
    return cls(cfg, **cfg.options, **extra)


def build_loss(cfg: LossConfig, context: LossContext | None = None) -> DistillationLoss:
    """The loss a recipe's ``loss`` section names (see the module docstring for the accepted names), with the TRG
    terms added on top when the section has ``trg`` (`kd.losses.trg.TRGLoss` wraps the logit loss)."""
    context = context or LossContext()
    loss = _build_logit_loss(cfg, context)
    if cfg.trg is not None:
        from kd.losses.trg import TRGLoss  # imported only by runs that use it

        loss = TRGLoss(loss, cfg.trg, context=context)
    return loss


def _build_logit_loss(cfg: LossConfig, context: LossContext) -> DistillationLoss:
    name = cfg.name
    if name in SIMPLE_LOSSES:
        if cfg.options:
            raise UserError(f"loss {name!r} takes no options (got {', '.join(sorted(cfg.options))}); remove "
                            "`loss.options` or use a loss class that accepts them", key="loss.options")
        return SIMPLE_LOSSES[name](cfg)
    if name in CLASS_LOSSES:
        return _build_class_loss(CLASS_LOSSES[name], cfg, context)
    if "." in name:
        return _build_class_loss(name, cfg, context)
    raise UserError(f"unknown loss {name!r}; valid names: {', '.join(valid_names())}, or a dotted path "
                    "`pkg.module.ClassName` to a DistillationLoss subclass", key="loss.name")
