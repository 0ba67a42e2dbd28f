"""kind: chat — one conversation per sample, formatted by the tokenizer's chat template, loss on assistant turns only.

Which tokens belong to an assistant turn is found from the template itself, so any template works: render the
conversation up to the turn with a generation prompt (everything the model is given) and up to and including the
turn (what it must produce); the characters in between are the turn's answer, including the template's end-of-turn
marker, which the model must learn to emit. The full conversation is tokenized once and a token gets a label when it
starts inside such a span (character offsets from the fast tokenizer). If a template rewrites earlier turns so that
prefixes are not prefixes (some "thinking" templates do), the assistant's content is located in the full text instead.

A sample is either a list of {role, content} turns (`messages_field`) or a `prompt_field`/`response_field` pair,
which becomes [user, assistant]. Samples longer than `seq_len` are cut (and counted) or rejected (`overlong`).
"""
from __future__ import annotations

from typing import Any, Optional

import datasets
import pyarrow.compute as pc

from kd.config.schema import DataConfig
from kd.data.sources import require_columns
from kd.data.stats import DataStats, attach_stats, count_tokens
from kd.errors import UserError
from kd.labels import IGNORE_INDEX

CHAT_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "truncated": datasets.Value("bool"),
})


def _messages(row: dict[str, Any], index: int, fields: dict[str, Optional[str]]) -> list[dict[str, str]]:
    """The sample's turns as plain {role, content} dicts (other keys are dropped: templates see only these)."""
    if fields["messages"] is not None:
        turns = row[fields["messages"]]
        if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
            raise UserError(f"sample {index}: {fields['messages']!r} must be a list of {{role, content}} objects",
                            key="data.messages_field")
    else:
        turns = [{"role": "user", "content": row[fields["prompt"]]},
                 {"role": "assistant", "content": row[fields["response"]]}]
    out = []
    for turn in turns:
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise UserError(f"sample {index}: every turn needs a string role and string content, got {turn!r}",
                            key="data.messages_field")
        out.append({"role": role, "content": content})
    return out


def _render(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool, index: int) -> str:
    """The chat template's text for `turns`; template errors name the sample."""
    try:
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # jinja2 TemplateError or the template's own raise_exception(...)
        raise UserError(f"sample {index}: the chat template rejected the conversation: {exc}",
                        key="data.messages_field") from exc


def assistant_spans(tokenizer: Any, turns: list[dict[str, str]], index: int) -> tuple[str, list[tuple[int, int]]]:
    """Render `turns`; return (full text, character spans [start, end) that the assistant must produce)."""
    full = _render(tokenizer, turns, False, index)
    spans, cursor = [], 0
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        given = _render(tokenizer, turns[:i], True, index) if i else ""
        produced = _render(tokenizer, turns[: i + 1], False, index)
        if produced.startswith(given) and full.startswith(produced) and len(given) >= cursor:
            start, end = len(given), len(produced)
        else:  # the template rewrites history: fall back to the turn's content as it appears in the full text
            start = full.find(turn["content"], cursor)
            if start < 0:
                raise UserError(f"sample {index}: cannot find assistant turn {i} in the chat template's output",
                                key="data.kind")
            end = start + len(turn["content"])
        spans.append((start, end))
        cursor = end
    if not spans:
        raise UserError(f"sample {index} has no assistant turn, so it has nothing to learn; "
                        "remove it or add the assistant's reply", key="data.messages_field")
    return full, spans


def _label_tokens(tokenizer: Any, full: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Tokenize `full`; labels = token id where the token starts inside an assistant span, else -100."""
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    ids, labels, s = enc["input_ids"], [], 0
    for token, (start, end) in zip(ids, enc["offset_mapping"]):
        while s < len(spans) and spans[s][1] <= start:
            s += 1
        inside = s < len(spans) and spans[s][0] <= start < spans[s][1] and end > start
        labels.append(token if inside else IGNORE_INDEX)
    return ids, labels


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, tokenizer: Any, fields: dict[str, Optional[str]],
                    seq_len: int, overlong: str) -> dict[str, list]:
    """`Dataset.map` function: conversations -> input_ids/labels/truncated; drops samples left without loss tokens."""
    out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": []}
    for row_index, index in enumerate(indices):
        row = {name: column[row_index] for name, column in batch.items()}
        full, spans = assistant_spans(tokenizer, _messages(row, index, fields), index)
        ids, labels = _label_tokens(tokenizer, full, spans)
        truncated = len(ids) > seq_len
        if truncated and overlong == "error":
            raise UserError(f"sample {index} has {len(ids)} tokens, more than seq_len={seq_len}; raise data.seq_len "
                            "or set data.overlong: truncate", key="data.overlong")
        ids, labels = ids[:seq_len], labels[:seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            continue  # every assistant token was cut off: the sample would only cost compute
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["truncated"].append(truncated)
    return out


def sample_fields(rows: datasets.Dataset, cfg: DataConfig, split: str) -> dict[str, Optional[str]]:
    """Which sample form the data uses: the messages column if present, else the prompt/response pair."""
    if cfg.messages_field in rows.column_names:
        return {"messages": cfg.messages_field, "prompt": None, "response": None}
    if cfg.prompt_field in rows.column_names or cfg.response_field in rows.column_names:
        require_columns(rows, {"data.prompt_field": cfg.prompt_field, "data.response_field": cfg.response_field},
                        what=split)
        return {"messages": None, "prompt": cfg.prompt_field, "response": cfg.response_field}
    raise UserError(
        f"the {split} data has neither a {cfg.messages_field!r} column (data.messages_field) nor "
        f"{cfg.prompt_field!r}/{cfg.response_field!r} columns (data.prompt_field/data.response_field); "
        f"it has {', '.join(rows.column_names)}", key="data.messages_field")


def build_chat(rows: datasets.Dataset, tokenizer: Any, cfg: DataConfig, *, split: str) -> datasets.Dataset:
    """Conversations -> `input_ids`/`labels` samples (at most seq_len tokens), with `DataStats` attached."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("the tokenizer has no chat template; use a tokenizer with one (an instruct model's) "
                        "or kind: text", key="data.kind")
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("kind: chat needs a fast (Rust) tokenizer for character offsets; "
                        "save the tokenizer with tokenizer.json", key="tokenizer")
    fields = sample_fields(rows, cfg, split)
    built = rows.map(
        _tokenize_batch,
        with_indices=True,
        batched=True,
        remove_columns=rows.column_names,
        features=CHAT_FEATURES,
        fn_kwargs={"tokenizer": tokenizer, "fields": fields, "seq_len": cfg.seq_len, "overlong": cfg.overlong},
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        desc=f"Tokenizing {split} conversations",
    )
    if len(built) == 0:
        raise UserError(f"no samples: none of the {len(rows)} {split} conversations keeps an assistant token within "
                        f"seq_len={cfg.seq_len}; raise data.seq_len", key="data.seq_len")
    truncated = pc.sum(built.data.column("truncated")).as_py() or 0
    built = built.remove_columns("truncated")
    stats = DataStats(kind="chat", documents=len(rows), samples=len(built),
                      tokens=count_tokens(built, "input_ids"),
                      loss_tokens=count_tokens(built, "labels", not_equal=IGNORE_INDEX),
                      truncated=truncated, dropped_samples=len(rows) - len(built))
    return attach_stats(built, stats)
