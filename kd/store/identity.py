"""What a teacher store was computed from, and the check that a training run asks for the same thing.

A stored top-k signal is only valid for exactly the token sequences it was computed on, tokenized by the same
tokenizer, at the same temperature, by the same teacher. Peers store and hope (DistillKit warns in its docs, axolotl
checks nothing); kd records each of these in the manifest and refuses a run that differs in any, listing them all.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

import numpy as np

from kd.config.schema import Recipe


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Token -> id map and special tokens: two tokenizers with equal hashes turn text into the same ids."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())}
    return _sha(json.dumps([vocab, specials], ensure_ascii=False))


def chat_template_hash(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    return _sha(template if isinstance(template, str) else json.dumps(template, sort_keys=True))


def samples_fingerprint(dataset: Optional[Any]) -> Optional[str]:
    """sha256 over every sample's input ids and labels, in row order (the store's rows are these rows)."""
    if dataset is None:
        return None
    digest = hashlib.sha256()
    for start in range(0, len(dataset), 1024):
        rows = dataset[start:start + 1024]
        for ids, labels in zip(rows["input_ids"], rows["labels"]):
            digest.update(np.asarray(ids, dtype=np.int64).tobytes())
            digest.update(b"|")
            digest.update(np.asarray(labels, dtype=np.int64).tobytes())
            digest.update(b"#")
    return digest.hexdigest()


def teacher_identity(recipe: Recipe) -> dict[str, Any]:
    """The teacher the recipe names: its path (or inline config) and, for a fusion, every model with its weights."""
    t = recipe.teacher
    identity: dict[str, Any] = {"path": t.path, "gguf_file": t.gguf_file,
                                "config": _sha(json.dumps(t.config, sort_keys=True)) if t.config else None}
    if t.fusion is not None:
        identity["fusion"] = _sha(json.dumps(t.fusion.model_dump(mode="json"), sort_keys=True))
    return identity


def expected_identity(recipe: Recipe, tokenizer: Any, vocab_size: int, train_ds: Any, eval_ds: Any) -> dict[str, Any]:
    """The manifest fields a store must have for this recipe's run to train from it."""
    return {
        "tokenizer_sha256": tokenizer_hash(tokenizer),
        "chat_template_sha256": chat_template_hash(tokenizer),
        "vocab_size": int(vocab_size),
        "temperature": float(recipe.loss.temperature),
        "seq_len": int(recipe.data.seq_len),
        "data_kind": recipe.data.kind,
        "teacher": teacher_identity(recipe),
        "samples": {"train": samples_fingerprint(train_ds), "eval": samples_fingerprint(eval_ds)},
        "num_samples": {"train": len(train_ds), "eval": len(eval_ds) if eval_ds is not None else 0},
    }


_WHAT_TO_DO = {
    "tokenizer_sha256": "the run tokenizes with another tokenizer",
    "chat_template_sha256": "the tokenizer's chat template differs",
    "vocab_size": "the vocabulary differs",
    "temperature": "set loss.temperature to the store's temperature (the stored log-probs are at that temperature)",
    "seq_len": "set data.seq_len to the store's",
    "data_kind": "set data.kind to the store's",
    "teacher": "the store was computed by another teacher",
    "samples": "the tokenized samples differ (data files, max_documents, eval split, train.seed's held-out split, "
               "seq_len or truncation)",
    "num_samples": "the number of samples differs",
}


def differences(manifest: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """One line per field where the store and the run disagree (empty: the store fits the run)."""
    lines = []
    for key, want in expected.items():
        have = manifest.get(key)
        if have != want:
            lines.append(f"{key}: store {_short(have)}, run {_short(want)} ({_WHAT_TO_DO.get(key, 'differs')})")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
