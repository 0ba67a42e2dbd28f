"""Loading raw rows from every supported source, and the errors users see for bad sources."""
from __future__ import annotations

import json

import datasets
import pytest

from kd.config.schema import DatasetSource
from kd.data.sources import load_source, looks_like_local_path
from kd.errors import UserError
from tests.unit.data.data_helpers import documents, write_jsonl

DOCS = documents(6)


def _texts(ds):
    return list(ds["text"])


def test_jsonl_json_parquet_txt(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in DOCS])
    as_json = tmp_path / "d.json"
    as_json.write_text(json.dumps([{"text": t} for t in DOCS]))
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_dict({"text": DOCS}).to_parquet(str(parquet))
    txt = tmp_path / "d.txt"
    txt.write_text("\n".join(DOCS) + "\n")
    for path in (jsonl, as_json, parquet, txt):
        ds = load_source(DatasetSource(path=str(path)), key="data.train")
        assert _texts(ds) == DOCS, path.suffix


def test_save_to_disk_dataset_and_dict(tmp_path):
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": DOCS[:4]}),
        "validation": datasets.Dataset.from_dict({"text": DOCS[4:]}),
    }).save_to_disk(str(tmp_path / "dict"))
    assert _texts(load_source(DatasetSource(path=str(tmp_path / "single")), key="data.train")) == DOCS
    assert _texts(load_source(DatasetSource(path=str(tmp_path / "dict"), split="validation"),
                              key="data.eval")) == DOCS[4:]
    with pytest.raises(UserError, match="validation|train") as err:
        load_source(DatasetSource(path=str(tmp_path / "dict"), split="test"), key="data.eval")
    assert err.value.key == "data.eval.split"


def test_resolve_path_is_applied(tmp_path):
    path = write_jsonl(tmp_path / "real.jsonl", [{"text": t} for t in DOCS])
    seen = []

    def resolve(p):
        seen.append(p)
        return str(path) if p == "asset:tiny" else p

    ds = load_source(DatasetSource(path="asset:tiny"), key="data.train", resolve_path=resolve)
    assert seen == ["asset:tiny"] and _texts(ds) == DOCS


@pytest.mark.parametrize("name", ["missing.jsonl", "sub/dir/missing", "./missing"])
def test_missing_local_path(tmp_path, name):
    path = name if name.startswith(".") else str(tmp_path / name)
    with pytest.raises(UserError, match="file not found") as err:
        load_source(DatasetSource(path=path), key="data.train")
    assert err.value.key == "data.train.path"


def test_path_vs_hub_name():
    assert looks_like_local_path("/abs/x") and looks_like_local_path("data/train.jsonl")
    assert looks_like_local_path("a/b/c") and looks_like_local_path("corpus.parquet")
    assert not looks_like_local_path("HuggingFaceFW/fineweb") and not looks_like_local_path("wikitext")


def test_invalid_jsonl_names_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken"\n{"text": "fine"}\n')
    with pytest.raises(UserError) as err:
        load_source(DatasetSource(path=str(path)), key="data.train")
    assert err.value.file == str(path) and err.value.key == "data.train.path"
    assert "json" in err.value.message.lower()


def test_empty_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="no samples"):
        load_source(DatasetSource(path=str(empty)), key="data.train")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "empty.parquet"))
    for path in (blank, tmp_path / "empty.parquet"):
        with pytest.raises(UserError, match="no samples") as err:
            load_source(DatasetSource(path=str(path)), key="data.eval")
        assert err.value.key == "data.eval.path"


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(UserError, match="unsupported file type"):
        load_source(DatasetSource(path=str(path)), key="data.train")
