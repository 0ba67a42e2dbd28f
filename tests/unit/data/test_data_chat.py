"""kind: chat — chat template formatting, assistant-only labels, sample forms, overlong handling, errors."""
from __future__ import annotations

import copy

import pytest

from kd.config.schema import DataConfig
from kd.data import build_datasets, stats_of
from kd.errors import UserError
from tests.helpers.tiny import END_OF_TURN
from tests.unit.data.data_helpers import conversation, write_jsonl


def chat_cfg(path, **kw) -> DataConfig:
    kw.setdefault("eval_fraction", 0.0)
    return DataConfig(kind="chat", train={"path": str(path)}, **kw)


def labelled_runs(sample) -> list[list[int]]:
    """Maximal runs of consecutive positions that carry a label, as their label ids."""
    runs, current = [], []
    for token, label in zip(sample["input_ids"], sample["labels"]):
        if label == -100:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token  # labels are unshifted
            current.append(label)
    return runs + ([current] if current else [])


def test_loss_only_on_assistant_turns(tmp_path, tokenizer):
    convs = [conversation(i) for i in range(6)]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    train, evaluation = build_datasets(chat_cfg(path, seq_len=256), tokenizer, seed=0)
    assert evaluation is None and len(train) == 6
    for sample, conv in zip(train, convs):
        expected_text = tokenizer.apply_chat_template(conv, tokenize=False)
        assert tokenizer.decode(sample["input_ids"]) == expected_text
        answers = [t["content"] + END_OF_TURN for t in conv if t["role"] == "assistant"]
        assert [tokenizer.decode(run) for run in labelled_runs(sample)] == answers
    stats = stats_of(train)
    assert stats.kind == "chat" and stats.truncated == 0 and stats.samples == 6
    assert stats.loss_tokens == sum(sum(label != -100 for label in s["labels"]) for s in train)


def test_prompt_response_form(tmp_path, tokenizer):
    rows = [{"question": f"Name number {i}?", "answer": f"Number {i}."} for i in range(4)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    train, _ = build_datasets(chat_cfg(path, prompt_field="question", response_field="answer"), tokenizer, seed=0)
    for sample, row in zip(train, rows):
        conv = [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": row["answer"]}]
        assert tokenizer.decode(sample["input_ids"]) == tokenizer.apply_chat_template(conv, tokenize=False)
        assert [tokenizer.decode(run) for run in labelled_runs(sample)] == [row["answer"] + END_OF_TURN]


def test_template_that_rewrites_history_falls_back_to_content(tmp_path, tokenizer):
    # The generation prompt differs from how a finished assistant turn is rendered, so prefixes are not prefixes.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>Sure:{% endif %}")
    conv = conversation(3)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conv}])
    train, _ = build_datasets(chat_cfg(path), tok, seed=0)
    answers = [t["content"] for t in conv if t["role"] == "assistant"]
    assert [tok.decode(run) for run in labelled_runs(train[0])] == answers


def test_sample_without_assistant_is_named(tmp_path, tokenizer):
    rows = [{"messages": conversation(0)}, {"messages": [{"role": "user", "content": "Hello?"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(UserError, match="sample 1 has no assistant turn"):
        build_datasets(chat_cfg(path), tokenizer, seed=0)


def test_overlong_truncate_counts_and_error_stops(tmp_path, tokenizer):
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]
    rows = [{"messages": short}, {"messages": conversation(1)}, {"messages": short}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    full_len = len(tokenizer.apply_chat_template(conversation(1), tokenize=True, return_dict=True)["input_ids"])
    short_len = len(tokenizer.apply_chat_template(short, tokenize=True, return_dict=True)["input_ids"])
    seq_len = full_len - 5
    assert short_len <= seq_len < full_len
    train, _ = build_datasets(chat_cfg(path, seq_len=seq_len), tokenizer, seed=0)
    assert [len(s["input_ids"]) for s in train] == [short_len, seq_len, short_len]
    assert stats_of(train).truncated == 1 and stats_of(train).dropped_samples == 0
    with pytest.raises(UserError, match="sample 1 has") as err:
        build_datasets(chat_cfg(path, seq_len=seq_len, overlong="error"), tokenizer, seed=0)
    assert err.value.key == "data.overlong"


def test_sample_with_no_assistant_token_left_is_dropped(tmp_path, tokenizer):
    long_prompt = [{"role": "user", "content": "word " * 40}, {"role": "assistant", "content": "Ok."}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": long_prompt}, {"messages": short}])
    train, _ = build_datasets(chat_cfg(path, seq_len=16), tokenizer, seed=0)
    assert len(train) == 1 and tokenizer.decode(labelled_runs(train[0])[0]) == "Yo." + END_OF_TURN
    assert stats_of(train).dropped_samples == 1 and stats_of(train).truncated == 0


def test_missing_fields_list_columns(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"dialog": [], "source": "x"}])
    with pytest.raises(UserError) as err:
        build_datasets(chat_cfg(path), tokenizer, seed=0)
    assert err.value.key == "data.messages_field" and "dialog" in err.value.message and "source" in err.value.message
    path = write_jsonl(tmp_path / "half.jsonl", [{"prompt": "a", "source": "x"}])
    with pytest.raises(UserError) as err:
        build_datasets(chat_cfg(path), tokenizer, seed=0)
    assert err.value.key == "data.response_field" and "prompt" in err.value.message


def test_tokenizer_without_chat_template(tmp_path, tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(0)}])
    with pytest.raises(UserError, match="chat template") as err:
        build_datasets(chat_cfg(path), tok, seed=0)
    assert err.value.key == "data.kind"


def test_held_out_conversations(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": conversation(i)} for i in range(10)])
    train, evaluation = build_datasets(chat_cfg(path, eval_fraction=0.3), tokenizer, seed=1)
    assert (len(train), len(evaluation)) == (7, 3)
    decoded = lambda ds: {tokenizer.decode(s["input_ids"]) for s in ds}  # noqa: E731
    assert decoded(train).isdisjoint(decoded(evaluation))
    everything = {tokenizer.apply_chat_template(conversation(i), tokenize=False) for i in range(10)}
    assert decoded(train) | decoded(evaluation) == everything
