"""The on-disk form of a teacher store: shards of per-token top-k log-probs and the manifest that vouches for them.

    DIR/manifest.json            written last (atomically): a store without one is unfinished and never read
    DIR/settings.json            what the store is being written with; a resumed precompute must match it
    DIR/shards/train-00000.st    samples [first, first + count) of the train split (safetensors bytes, or zlib'd)
    DIR/shards/train-00000.json  the shard's size and sha256, written after the shard is in place: the shard is done

Per sample the loss tokens are those whose shifted label is not IGNORE_INDEX, in position order; ``offsets`` [n + 1]
cuts the token arrays into samples. Per loss token: ``ids`` [K] (the teacher's top-k at the store's temperature),
their log-probs, ``tail`` (log of the mass outside the k) and ``label`` (the teacher's log-prob of the label token,
for the held-out teacher perplexity).

Two formats:
- ``plain``: int32 ids, fp32 log-probs, fp32 tail and label: 8 K + 8 bytes per token, exact.
- ``compact``: each token's entries sorted by id and the ids stored as deltas (uint16 while the vocabulary fits,
  else int32), log-probs quantized to 8 bits on the token's own [min, max] range (two fp32 bounds per token), tail
  and label in fp16, the whole shard zlib-compressed. Reading dequantizes and renormalizes the k + 1 buckets to a
  distribution again; the error this costs is measured by tools/bench_store.py (KL of stored vs dense teacher).
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kd.errors import UserError
from kd.files import atomic_write

FORMAT_VERSION = 1
FORMATS = ("plain", "compact")
MANIFEST = "manifest.json"
SETTINGS = "settings.json"
SHARDS = "shards"


@dataclass
class ShardTokens:
    """The decoded content of one shard (or of a batch of samples on their way into one)."""

    offsets: torch.Tensor  # [n + 1] int64: sample i's tokens are rows offsets[i]:offsets[i + 1]
    ids: torch.Tensor  # [T, K] int64
    logprobs: torch.Tensor  # [T, K] fp32
    tail: torch.Tensor  # [T] fp32
    label: torch.Tensor  # [T] fp32

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.ids[lo:hi], self.logprobs[lo:hi], self.tail[lo:hi], self.label[lo:hi]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}"


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ encoding
def _quantize(logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8-bit codes of each row on its own [lo, hi] range (lo = the row's smallest finite log-prob)."""
    finite = torch.isfinite(logprobs)
    hi = torch.where(finite, logprobs, torch.full_like(logprobs, -torch.inf)).amax(-1)
    lo = torch.where(finite, logprobs, torch.full_like(logprobs, torch.inf)).amin(-1)
    hi = torch.where(torch.isfinite(hi), hi, torch.zeros_like(hi))
    lo = torch.where(torch.isfinite(lo), lo, hi)
    span = (hi - lo).clamp_min(1e-12)
    codes = ((logprobs.clamp(min=lo[:, None]) - lo[:, None]) / span[:, None] * 255).round().clamp(0, 255)
    return codes.to(torch.uint8), lo, hi


def _dequantize(codes: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    return lo[:, None] + codes.float() / 255 * (hi - lo)[:, None]


def encode(tokens: ShardTokens, fmt: str, vocab_size: int) -> bytes:
    from safetensors.torch import save as _save

    def save(tensors: dict[str, torch.Tensor]) -> bytes:
        return _save({name: t.contiguous() for name, t in tensors.items()})

    if fmt == "plain":
        return save({"offsets": tokens.offsets.long(), "ids": tokens.ids.to(torch.int32),
                     "logprobs": tokens.logprobs.float(), "tail": tokens.tail.float(), "label": tokens.label.float()})
    order = tokens.ids.argsort(dim=-1)
    ids = tokens.ids.gather(-1, order)
    logprobs = tokens.logprobs.float().gather(-1, order)
    deltas = torch.cat([ids[:, :1], ids[:, 1:] - ids[:, :-1]], dim=-1)
    codes, lo, hi = _quantize(logprobs)
    blob = save({"offsets": tokens.offsets.long(),
                 "id_deltas": deltas.to(torch.uint16 if vocab_size <= 65536 else torch.int32),
                 "codes": codes, "lo": lo.float(), "hi": hi.float(),
                 "tail": tokens.tail.to(torch.float16), "label": tokens.label.to(torch.float16)})
    return zlib.compress(blob, 6)


def _renormalized(logprobs: torch.Tensor, tail: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The k + 1 buckets shifted so that they sum to one again (quantization moved each a little)."""
    total = torch.logsumexp(torch.cat([logprobs, tail[:, None]], dim=-1), dim=-1)
    return logprobs - total[:, None], tail - total


def decode(data: bytes, fmt: str) -> ShardTokens:
    from safetensors.torch import load

    if fmt == "plain":
        t = load(data)
        return ShardTokens(t["offsets"], t["ids"].long(), t["logprobs"], t["tail"], t["label"])
    t = load(zlib.decompress(data))
    ids = t["id_deltas"].long().cumsum(dim=-1)
    logprobs, tail = _renormalized(_dequantize(t["codes"], t["lo"], t["hi"]), t["tail"].float())
    return ShardTokens(t["offsets"], ids, logprobs, tail, t["label"].float())


# ------------------------------------------------------------------ shards on disk
def write_shard(store_dir: str, split: str, index: int, tokens: ShardTokens, *, fmt: str, vocab_size: int,
                first: int) -> dict[str, Any]:
    """Write one shard so that a reader (or a resumed precompute) sees it whole or not at all: the data file first
    (temporary name, fsync, rename), then its record (size + sha256), whose presence marks the shard done."""
    name = shard_name(split, index)
    folder = os.path.join(store_dir, SHARDS)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name + ".st")
    tmp = f"{path}.tmp{os.getpid()}"
    data = encode(tokens, fmt, vocab_size)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    record = {"file": f"{SHARDS}/{name}.st", "split": split, "index": index, "first": first,
              "count": int(tokens.offsets.numel() - 1), "tokens": int(tokens.ids.shape[0]), "bytes": len(data),
              "sha256": hashlib.sha256(data).hexdigest()}
    atomic_write(os.path.join(folder, name + ".json"), json.dumps(record, indent=1) + "\n")
    return record


def finished_shard(store_dir: str, split: str, index: int) -> Optional[dict[str, Any]]:
    """The record of a shard a precompute finished (its data file present, of the recorded size and checksum), or
    None: a shard killed mid-write has no record, or a data file that does not match it, and is written again."""
    name = shard_name(split, index)
    record_path = os.path.join(store_dir, SHARDS, name + ".json")
    data_path = os.path.join(store_dir, SHARDS, name + ".st")
    try:
        with open(record_path) as f:
            record = json.load(f)
        if os.path.getsize(data_path) != record["bytes"] or sha256_file(data_path) != record["sha256"]:
            return None
    except (OSError, ValueError, KeyError):
        return None
    return record


def read_shard(store_dir: str, record: dict[str, Any], fmt: str) -> ShardTokens:
    """Read a shard the manifest lists, refusing one that is missing, truncated or altered (named in the error)."""
    path = os.path.join(store_dir, record["file"])
    hint = "the store is damaged: run `kd precompute` again into a new directory (or delete this shard and its " \
           ".json and run the same precompute command to rewrite it)"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"cannot read shard {record['file']}: {e.strerror or e}; {hint}", key="teacher.store",
                        file=path) from None
    if len(data) != record["bytes"]:
        raise UserError(f"shard {record['file']} has {len(data)} bytes, the manifest says {record['bytes']} "
                        f"(truncated?); {hint}", key="teacher.store", file=path)
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise UserError(f"shard {record['file']} does not match its checksum in the manifest (corrupt); {hint}",
                        key="teacher.store", file=path)
    tokens = decode(data, fmt)
    if tokens.offsets.numel() - 1 != record["count"] or tokens.ids.shape[0] != record["tokens"]:
        raise UserError(f"shard {record['file']} holds {tokens.offsets.numel() - 1} samples / {tokens.ids.shape[0]} "
                        f"tokens, the manifest says {record['count']} / {record['tokens']}; {hint}",
                        key="teacher.store", file=path)
    return tokens


# ------------------------------------------------------------------ manifest
def read_manifest(store_dir: str) -> dict[str, Any]:
    path = os.path.join(store_dir, MANIFEST)
    if not os.path.isdir(store_dir):
        raise UserError(f"no such directory: {store_dir}; write a store first with `kd precompute RECIPE --out "
                        f"{store_dir}`", key="teacher.store")
    if not os.path.isfile(path):
        raise UserError(f"{store_dir} has no {MANIFEST}: the precompute that writes it did not finish; run the same "
                        "`kd precompute` command again to complete it", key="teacher.store")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {MANIFEST}: {e}", key="teacher.store", file=path) from None
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("format") not in FORMATS:
        raise UserError(f"store format {manifest.get('format')!r} version {manifest.get('format_version')!r} is not "
                        f"one this kd reads (version {FORMAT_VERSION}: {', '.join(FORMATS)}); precompute it again",
                        key="teacher.store", file=path)
    return manifest


def write_manifest(store_dir: str, manifest: dict[str, Any]) -> None:
    atomic_write(os.path.join(store_dir, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
