"""Vocabulary checks: logit losses compare teacher and student distributions token by token, so both must index the
same vocabulary.

Models often carry more lm_head rows than the tokenizer has tokens (padding to a multiple of 64/128, e.g. Qwen's 152064
rows for 151936 tokens). Those extra rows are never a real token, so the trainer simply cuts every model's logits to
the tokenizer's size; what cannot work is a model with *fewer* rows than the tokenizer has tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

from kd.errors import UserError

# How many differing tokens to quote in an error message.
_EXAMPLES = 5


def _text_config(config: Any) -> Any:
    """The decoder part of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _default_names(count: int) -> list[str]:
    # The engine's call is (tokenizer, teacher.config, student.config); several teachers get numbers.
    if count == 2:
        return ["teacher", "student"]
    return [f"model {i + 1}" for i in range(count)]


def shared_vocab_size(tokenizer: Any, *model_configs: Any, names: Sequence[str] | None = None) -> int:
    """The vocabulary size the logit losses use: ``len(tokenizer)``, after checking that every model covers it.

    ``names`` labels the configs in error messages (default: "teacher", "student" for two configs). A model whose
    ``vocab_size`` is smaller than the tokenizer raises UserError naming it and both sizes; a larger one is fine
    (padded lm_head rows, cut by the trainer).
    """
    size = len(tokenizer)
    labels = list(names) if names is not None else _default_names(len(model_configs))
    if len(labels) != len(model_configs):
        raise ValueError(f"shared_vocab_size: {len(labels)} names for {len(model_configs)} configs")
    for label, config in zip(labels, model_configs):
        model_vocab = _text_config(config).vocab_size
        if model_vocab < size:
            source = getattr(config, "_name_or_path", "") or getattr(config, "model_type", "")
            raise UserError(
                f"the {label} model ({source}) has vocab_size {model_vocab} but the tokenizer has {size} tokens: "
                f"token ids >= {model_vocab} would have no logit. Use a tokenizer that matches the models (recipe key "
                f"`tokenizer`), or a {label} with at least {size} output rows",
                key=label if label in ("teacher", "student") else "tokenizer",
            )
    return size


def check_same_tokenizer(tok_a: Any, tok_b: Any, *, key: str = "student.path") -> None:
    """Raise UserError unless both tokenizers map the same tokens to the same ids (``get_vocab()``).

    A token present in only one of them, or at different ids, counts as a difference: ids from one tokenizer would
    mean different text to a model trained with the other.
    """
    vocab_a, vocab_b = tok_a.get_vocab(), tok_b.get_vocab()
    differing = sorted(
        {tok for tok in vocab_a.keys() | vocab_b.keys() if vocab_a.get(tok) != vocab_b.get(tok)},
        key=lambda tok: min(vocab_a.get(tok, 1 << 62), vocab_b.get(tok, 1 << 62)),
    )
    if not differing:
        return
    examples = ", ".join(f"{tok!r}: {vocab_a.get(tok)} vs {vocab_b.get(tok)}" for tok in differing[:_EXAMPLES])
    raise UserError(
        f"teacher and student tokenizers differ ({len(differing)} tokens differ, e.g. {examples}; "
        f"sizes {len(vocab_a)} vs {len(vocab_b)}). Logit distillation needs one vocabulary: pick a student from the "
        "teacher's model family, or build it from the teacher (student.init_from_teacher_layers)",
        key=key,
    )


def max_positions(config: Any) -> int | None:
    """The longest sequence the model was configured for (``max_position_embeddings`` or ``n_positions``), or None."""
    text = _text_config(config)
    for attr in ("max_position_embeddings", "n_positions"):
        value = getattr(text, attr, None)
        if isinstance(value, int):
            return value
    return None
