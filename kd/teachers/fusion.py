"""Dynamic logit fusion as a teacher source: a large base steered, position by position, by small task experts.

The recipe's ``teacher:`` section is the large base; ``teacher.fusion:`` names the small base, the experts (each a
fine-tune of the small base) and the search (kd.fusion.solver). Every model is a `ModelTeacher` on its own
inference-only engine with its own ``zero_stage``; all of them run on every micro-batch, in one fixed order (large,
small, experts as listed) on every rank, because a ZeRO-3 forward is a collective. Their logits, cut to the run's
vocabulary, are fused per position and handed to the loss as dense teacher logits.

Only logits: the fused model has no hidden states and no lm_head of its own, so hidden-state losses (TRG) and the
teacher half of the fused-linear path are not defined on it (the student's head still runs in the loss kernel).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Sequence

import torch

from kd.config.schema import FusionConfig, ModelSource, Recipe
from kd.errors import UserError
from kd.fusion import stats as fstats
from kd.fusion.grid import grid_points
from kd.fusion.solver import FusionResult, fuse_logits
from kd.teachers.base import TeacherInfo, TeacherOutput, TeacherRequest
from kd.teachers.model import ModelTeacher

log = logging.getLogger(__name__)

# Config fields that must agree between an expert and the small base it was fine-tuned from; a difference is only a
# warning (the logits can still be fused when the vocabulary matches), but usually means a wrong directory.
_ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "num_attention_heads", "num_key_value_heads")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_NOT_DEFINED = ("a fused teacher gives logits only: hidden-state losses (TRG) are not defined on a fusion of models "
                "(whose hidden states would they read?); drop loss.trg or use one teacher")


class FusionTeacher:
    """`TeacherSource` over a large base, a small base and T experts (`ModelTeacher`s), fused by `fuse_logits`."""

    def __init__(self, large: ModelTeacher, small: ModelTeacher, experts: Sequence[ModelTeacher], cfg: FusionConfig,
                 *, vocab_size: int, name: str = ""):
        if not experts:
            raise UserError("fusion needs at least one expert", key="teacher.fusion.experts")
        self.large, self.small, self.experts = large, small, list(experts)
        self.cfg = cfg
        self.grid = grid_points(cfg.grid.low, cfg.grid.high, cfg.grid.step)
        self.vocab_size = vocab_size
        self.weight_values = fstats.weight_values(self.grid, cfg.static_weights if cfg.mode == "static" else None)
        if cfg.mode == "static" and cfg.static_weights is None:
            self.weight_values = [1.0]  # the solver's default: 1 per expert
        self._last = None
        self._info = TeacherInfo(
            name=name or f"fusion of {large.info.name} + {len(self.experts)} expert(s) over {small.info.name}",
            vocab_size=vocab_size, hidden_size=large.info.hidden_size, num_layers=large.info.num_layers,
            has_linear_head=False, config=large.info.config, signals=("dense",),
        )

    @property
    def info(self) -> TeacherInfo:
        return self._info

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor], request: TeacherRequest = TeacherRequest()) -> TeacherOutput:
        """Fused logits [B, L, vocab_size] (the large base's dtype). Every model runs, in the same order on every
        rank; the solver then works on the B*L positions (padding included: the mask only weighs the stats)."""
        if request.hidden or request.signal != "dense":
            raise UserError(_NOT_DEFINED, key="loss")
        dense, vocab = TeacherRequest(), self.vocab_size
        shape = (*batch["input_ids"].shape, vocab)
        # cut + reshape copies a padded head's logits, and the model's own [B, L, V_model] tensor is freed right away
        flat = [m(batch, dense).logits[..., :vocab].reshape(-1, vocab) for m in (self.large, self.small, *self.experts)]
        result = self.solve(flat[0], flat[1], flat[2:])
        self._last = fstats.batch_stats(result, batch.get("attention_mask"), self.weight_values)
        return TeacherOutput(logits=result.logits.view(shape))

    def solve(self, large: torch.Tensor, small: torch.Tensor, experts: Sequence[torch.Tensor]) -> FusionResult:
        """The recipe's search on [N, V] logits (what `__call__` applies to the models' outputs)."""
        return fuse_logits(large, small, experts, mode=self.cfg.mode, grid=self.grid,
                           static_weights=self.cfg.static_weights, chunk_rows=self.cfg.chunk_rows,
                           sweeps=self.cfg.sweeps)

    def head_weight(self):
        raise ValueError("a fused teacher has no lm_head (info.has_linear_head is False): the loss reads its logits")

    def last_stats(self) -> dict[str, float]:
        """Sums and counts of the latest call (kd.fusion.stats: names, and `summary` for the means after summing over
        micro-batches and an all-reduce across ranks); empty before the first call. One host sync."""
        names, values = self.last_stats_vector()
        return dict(zip(names, values.tolist())) if values is not None else {}

    def last_stats_vector(self) -> tuple[list[str], torch.Tensor | None]:
        """The same as names + one fp64 vector on the models' device (no host sync): add it up over a step's
        micro-batches and all-reduce it (sum) as one tensor; None before the first call."""
        return fstats.stat_names(len(self.experts), self.weight_values), self._last


def _sections(recipe: Recipe) -> list[tuple[str, str, ModelSource]]:
    """(recipe key, label for messages, section) of every model, in the order they load and run on every rank."""
    fusion = recipe.teacher.fusion
    out = [("teacher", "the large base", recipe.teacher), ("teacher.fusion.small_base", "the small base", fusion.small_base)]
    out += [(f"teacher.fusion.experts.{i}", f"expert {i}", e) for i, e in enumerate(fusion.experts)]
    return out


def _describe(key: str, label: str, cfg: ModelSource) -> str:
    return f"{label} ({key}.path {cfg.path})" if cfg.path else f"{label} ({key}.config, inline)"


def check_fusion_models(recipe: Recipe, tokenizer: Any, *, resolve_path: Callable[[str], str]) -> int:
    """Configs and tokenizers only (no weights): every model covers the run's tokenizer and sequence length, every
    model directory that ships a tokenizer has exactly the run's tokens (else UserError naming both), and an expert
    whose architecture differs from the small base's gets a warning. Returns the shared vocabulary size."""
    from kd.models import check_same_tokenizer, load_tokenizer, max_positions, shared_vocab_size, source_config

    if recipe.loss.trg is not None:
        raise UserError(_NOT_DEFINED, key="loss.trg")
    fusion = recipe.teacher.fusion
    sections = _sections(recipe)
    reference = (f"the run's tokenizer (tokenizer {recipe.tokenizer})" if recipe.tokenizer
                 else _describe(*sections[0]))
    configs = {}
    for key, label, cfg in sections:
        config = source_config(cfg, section=key, resolve_path=resolve_path)
        configs[key] = config
        try:
            shared_vocab_size(tokenizer, config, names=[label])
        except UserError as e:
            raise UserError(f"{e.message} (fusion adds the models' logits token by token)", key=key) from None
        limit = max_positions(config)
        if limit is not None and recipe.data.seq_len > limit:
            raise UserError(f"{recipe.data.seq_len} is larger than {label}'s maximum of {limit} positions; lower it",
                            key="data.seq_len")
        local = resolve_path(cfg.path) if cfg.path else None
        if key == "teacher" and not recipe.tokenizer:
            continue  # the run's tokenizer is this directory's
        if local and os.path.isdir(local) and any(os.path.isfile(os.path.join(local, n)) for n in _TOKENIZER_FILES):
            own = load_tokenizer(local, trust_remote_code=cfg.trust_remote_code, key=f"{key}.path")
            try:
                check_same_tokenizer(tokenizer, own, key=f"{key}.path")
            except UserError:
                raise UserError(
                    f"{_describe(key, label, cfg)} and {reference} have different tokenizers ({len(own.get_vocab())} "
                    f"vs {len(tokenizer.get_vocab())} tokens, or the same tokens at other ids): fusion adds the "
                    "models' logits token by token, so the large base, the small base and every expert must share "
                    "one vocabulary", key=f"{key}.path") from None
    small = configs["teacher.fusion.small_base"]
    for i, expert in enumerate(fusion.experts):
        key = f"teacher.fusion.experts.{i}"
        differ = [f"{f} {getattr(configs[key], f, None)} vs {getattr(small, f, None)}" for f in _ARCHITECTURE_FIELDS
                  if getattr(configs[key], f, None) != getattr(small, f, None)]
        if differ:
            log.warning("%s differs from %s in %s: an expert is expected to be a fine-tune of the small base "
                        "(the vocabularies match, so the fusion still runs)", _describe(key, f"expert {i}", expert),
                        _describe("teacher.fusion.small_base", "the small base", fusion.small_base), "; ".join(differ))
    return len(tokenizer)


def build_fusion_teacher(recipe: Recipe, *, device: torch.device, resolve_path: Callable[[str], str],
                         tokenizer: Any = None) -> FusionTeacher:
    """Check the models (configs), then load each onto its own engine, in the same order on every rank."""
    from kd.engine.ds_config import teacher_config
    from kd.models import load_teacher, load_tokenizer

    if tokenizer is None:
        teacher = recipe.teacher
        tokenizer = load_tokenizer(resolve_path(recipe.tokenizer or teacher.path), key="tokenizer" if recipe.tokenizer
                                   else "teacher.path", trust_remote_code=teacher.trust_remote_code,
                                   gguf_file=None if recipe.tokenizer else teacher.gguf_file)
    vocab = check_fusion_models(recipe, tokenizer, resolve_path=resolve_path)
    models = []
    for key, label, cfg in _sections(recipe):
        ds_config = teacher_config(cfg, micro_batch_size=recipe.train.micro_batch_size)  # None: a replica
        try:
            model = load_teacher(cfg, zero3_config=ds_config, resolve_path=resolve_path)
        except UserError as e:  # load_teacher names teacher.* keys; point at this model's section
            if e.key and e.key.startswith("teacher.") and key != "teacher":
                e.key = key + e.key[len("teacher"):]
            raise
        models.append(ModelTeacher(model, ds_config, device, name=_describe(key, label, cfg)))
    return FusionTeacher(models[0], models[1], models[2:], recipe.teacher.fusion, vocab_size=vocab)
