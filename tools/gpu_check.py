#!/usr/bin/env python
"""Helpers of tools/gpu_check.sh: the inputs of its GPU stages, and its summary table.

    python tools/gpu_check.py assets DIR [--tiny]      # tokenizer, corpus, recipes for bench_step and kd train
    python tools/gpu_check.py summary OUT_DIR          # OUT_DIR/summary.md from OUT_DIR/stages.tsv and the results

`assets` writes, without any model hub:

- ``tokenizer/``: a word-level tokenizer with as many entries as Qwen2.5's (151,665: 151,643 words + 22 specials), so
  the losses run over the vocabulary width of the real models (kd cuts every model's logits to the tokenizer's
  size, so a small tokenizer would shrink the benchmark). Words are ``w0``, ``w1``, ...: text of random words hits
  ids across the whole vocabulary.
- ``corpus.jsonl``: documents of seeded random words.
- ``bench.yaml`` / ``train.yaml``: recipes with randomly initialised models from inline configs (a Qwen2.5-1.5B-shaped
  teacher, a 0.5B-shaped student, bf16), so no weights are written to disk or downloaded. ``--tiny`` gives the same
  files at CPU sizes (fp32, 2-layer models, a 512-entry vocabulary), for the CPU smoke run.

`summary` reads the stage table the shell script wrote (name, status, seconds, per line) and pulls one key number
per stage out of its result (pytest's closing line, bench JSON, the run's metrics.jsonl).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path
from typing import Any

import yaml

QWEN_TOKENIZER_SIZE = 151665  # len(AutoTokenizer) of Qwen2.5: the lm_heads' 151,936 rows are padded past it
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|unk|>"]

# Qwen2.5-1.5B and -0.5B as their config.json describe them (both tie the lm_head to the embeddings).
TEACHER_GPU = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                   max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0)
STUDENT_GPU = dict(TEACHER_GPU, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                   num_attention_heads=14, num_key_value_heads=2)
TEACHER_TINY = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=576, tie_word_embeddings=True,
                    max_position_embeddings=256)
STUDENT_TINY = dict(TEACHER_TINY, hidden_size=32, intermediate_size=64, num_hidden_layers=1)

# Shapes per size: tokenizer entries, sequence length, micro-batch, documents x words of the corpus, dtype.
SIZES = {
    "gpu": dict(vocab=QWEN_TOKENIZER_SIZE, teacher=TEACHER_GPU, student=STUDENT_GPU, seq_len=2048, micro_batch=4,
                documents=160, words=1200, dtype="bf16"),
    "tiny": dict(vocab=512, teacher=TEACHER_TINY, student=STUDENT_TINY, seq_len=32, micro_batch=2,
                 documents=120, words=60, dtype="fp32"),
}
TRAIN_STEPS = 20
SAVE_EVERY = 10


def build_tokenizer(save_dir: Path, size: int) -> Any:
    """A word-level fast tokenizer of exactly `size` entries (`SPECIALS` first, then ``w0`` ...), saved to `save_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(size - len(SPECIALS))]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                      unk_token="<|unk|>", model_max_length=1 << 20)
    wrapped.save_pretrained(str(save_dir))
    return wrapped


def write_corpus(path: Path, *, vocab: int, documents: int, words: int, seed: int = 0) -> None:
    """`documents` lines of ``{"text": ...}``, each `words` random words of the tokenizer (never a special)."""
    rng = random.Random(seed)
    n_words = vocab - len(SPECIALS)
    with open(path, "w") as f:
        for i in range(documents):
            text = " ".join(f"w{rng.randrange(n_words)}" for _ in range(words))
            f.write(json.dumps({"text": text, "id": i}) + "\n")


def recipe(root: Path, size: str, *, output_dir: Path, max_steps: int, checkpoint_interval: int) -> dict[str, Any]:
    shape = SIZES[size]
    model = {"dtype": shape["dtype"]}
    return {
        "run": {"output_dir": str(output_dir), "nproc": 1, "progress_bar": False},
        "teacher": {**model, "config": dict(shape["teacher"]), "zero_stage": 0},
        "student": {**model, "config": dict(shape["student"]), "zero_stage": 2},
        "tokenizer": str(root / "tokenizer"),
        "data": {"train": {"path": str(root / "corpus.jsonl")}, "seq_len": shape["seq_len"], "eval_fraction": 0.05},
        "loss": {"name": "forward_kl", "fused_linear": False},
        "train": {"max_steps": max_steps, "micro_batch_size": shape["micro_batch"], "grad_accum": 1, "lr": 1e-4,
                  "warmup_steps": 2, "seed": 0},
        "eval": {"interval": 0, "max_batches": 2, "at_start": False},
        "checkpoint": {"interval": checkpoint_interval, "keep_last": 2},
        "resume": "auto",
    }


def write_assets(root: Path, *, tiny: bool) -> dict[str, Path]:
    """Tokenizer, corpus and the two recipes under `root`; returns their paths."""
    size = "tiny" if tiny else "gpu"
    shape = SIZES[size]
    root.mkdir(parents=True, exist_ok=True)
    build_tokenizer(root / "tokenizer", shape["vocab"])
    write_corpus(root / "corpus.jsonl", vocab=shape["vocab"], documents=shape["documents"], words=shape["words"])
    paths = {"tokenizer": root / "tokenizer", "corpus": root / "corpus.jsonl"}
    for name, steps, every in (("bench", 10, 0), ("train", TRAIN_STEPS, SAVE_EVERY)):
        # bench_step writes into a scratch directory of its own; the run directory matters for `kd train` only
        paths[name] = root / f"{name}.yaml"
        data = recipe(root, size, output_dir=root / f"run-{name}", max_steps=steps, checkpoint_interval=every)
        paths[name].write_text(yaml.safe_dump(data, sort_keys=False))
    return paths


# ---- summary ---------------------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    """The file's JSON, or that of its last line (bench_step's stdout also carries DeepSpeed's prints), or None."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for candidate in (text, *reversed(text.strip().splitlines()[-1:])):
        try:
            return json.loads(candidate)
        except ValueError:
            pass
    return None


def _pytest_number(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "-"
    for line in reversed(lines):
        if re.search(r"\d+ (passed|failed|error|skipped|deselected)", line):
            return line.strip(" =")
    return "-"


def _kernels_number(result: Any) -> str:
    records = [r for r in (result or {}).get("records", []) if r.get("method") == "kd" and "ratio_to_floor" in r]
    if not records:
        return "-"
    worst = max(records, key=lambda r: r["ratio_to_floor"])
    return f"{len(records)} kd timings, worst {worst['ratio_to_floor']:.2f}x floor ({worst['kind']} {worst['divergence']})"


def _bench_step_number(result: Any) -> str:
    if not isinstance(result, dict) or "ratio" not in result:
        return "-"
    return (f"KD/baseline {result['ratio']:.3f}, {result['kd_tokens_per_s']:.0f} tokens/s "
            f"(loss fwd+bwd {1e3 * (result['kd']['loss_fwd'] + result['kd']['loss_bwd']):.0f} ms)")


def _bench_generate_number(result: Any) -> str:
    if not isinstance(result, dict) or "gathered_once_vs_hf" not in result:
        return "-"
    return (f"ZeRO-3 gathered once {result['zero3_always']:.0f} tok/s per rank = {result['gathered_once_vs_hf']:.2f}x "
            f"HF replica, {result['gathered_once_vs_layers']:.1f}x layer by layer")


def _train_number(out: Path) -> str:
    info = _read_json(out / "train.json")
    return info.get("summary", "-") if isinstance(info, dict) else "-"


def stage_number(out: Path, stage: str) -> str:
    """The one number that tells how a stage went, read from what it left in `out`."""
    if stage == "pytest_gpu":
        return _pytest_number(out / "pytest_gpu.log")
    if stage == "bench_kernels":
        return _kernels_number(_read_json(out / "bench_kernels.json"))
    if stage.startswith("bench_step"):
        return _bench_step_number(_read_json(out / f"{stage}.json"))
    if stage == "bench_generate":
        return _bench_generate_number(_read_json(out / "bench_generate.json"))
    if stage == "train":
        return _train_number(out)
    return "-"


def read_stages(path: Path) -> list[tuple[str, str, str]]:
    """(stage, status, seconds) per line of the tab-separated stage table."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        parts = line.split("\t")
        if len(parts) >= 3 and parts[0]:
            rows.append((parts[0], parts[1], parts[2]))
    return rows


def summary_table(out: Path) -> str:
    rows = [("stage", "status", "seconds", "key number")]
    rows += [(stage, status, seconds, stage_number(out, stage)) for stage, status, seconds in read_stages(out / "stages.tsv")]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("assets", help="tokenizer, corpus and recipes for the GPU stages")
    p.add_argument("dir", type=Path)
    p.add_argument("--tiny", action="store_true", help="CPU sizes (the --cpu-smoke run)")
    p = sub.add_parser("summary", help="write OUT_DIR/summary.md and print it")
    p.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "assets":
        for name, path in write_assets(args.dir, tiny=args.tiny).items():
            print(f"{name}: {path}")
        return 0
    table = summary_table(args.out)
    (args.out / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
