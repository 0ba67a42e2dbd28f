"""Tiny, deterministic test fixtures shared by unit and integration tests.

`build_tiny_tokenizer` trains a byte-level BPE (vocabulary <= 512) on a few fixed sentences, so tests get a real
Hugging Face fast tokenizer (offsets, chat template, eos/pad) without downloading anything. The same call always
returns the same vocabulary and merges.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
END_OF_TURN = "<|end|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [EOS, PAD, END_OF_TURN, *ROLE_TOKENS]

# Every turn renders as <|role|>content<|end|>; a generation prompt is the bare <|assistant|> marker. No newlines, so
# tests can predict exactly which characters belong to an assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "In the beginning was the word, and the word was with the teacher.",
    "It is a truth universally acknowledged that a student in possession of a good teacher must learn.",
    "Pack the documents into blocks, shift the labels, and sum the loss over tokens.",
    "What is the capital of France? Paris is the capital of France.",
    "One, two, three, four, five, six, seven, eight, nine, ten.",
]

VOCAB_SIZE = 320


def build_tiny_tokenizer(save_dir: Optional[str | Path] = None) -> PreTrainedTokenizerFast:
    """Train the tiny byte-level BPE tokenizer and wrap it; optionally `save_pretrained` it into `save_dir`.

    The result has eos `<|endoftext|>`, pad `<|pad|>`, role markers as special tokens and a chat template.
    """
    tok = Tokenizer(models.BPE())
    # Byte-level: every string is encodable (no unknown token), like the real teachers' tokenizers.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS],
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
    if save_dir is not None:
        wrapped.save_pretrained(str(save_dir))
    return wrapped
