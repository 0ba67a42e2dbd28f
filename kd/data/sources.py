"""Turn one recipe `DatasetSource` into a `datasets.Dataset` of raw rows (text documents or conversations).

Everything is delegated to the `datasets` library, which also caches what it loads (keyed by the file's path and
modification time): local .jsonl/.json, .parquet and .txt files, directories written by `save_to_disk`, folders of
data files, and hub dataset names. This module only decides which loader to call and turns the library's failures
into `UserError`s that say which recipe key to fix.
"""
from __future__ import annotations

import os
from typing import Callable

import datasets

from kd.config.schema import DatasetSource
from kd.errors import UserError

# File suffix -> `datasets` packaged builder. Compressed variants (.jsonl.gz, ...) are decompressed by the builder.
_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}
_COMPRESSION = (".gz", ".bz2", ".xz", ".zst", ".zip")


def _suffix(path: str) -> str:
    """The data suffix of `path` ignoring a compression suffix: `a.jsonl.gz` -> `.jsonl`."""
    lower = path.lower()
    for comp in _COMPRESSION:
        if lower.endswith(comp):
            lower = lower[: -len(comp)]
            break
    return os.path.splitext(lower)[1]


def looks_like_local_path(path: str) -> bool:
    """True when `path` cannot be a hub dataset id (`name` or `org/name`), so a missing file is the user's typo.

    Hub ids have at most one slash and no file suffix; anything absolute, relative (`./`, `../`, `~`), deeper, or
    ending in a data suffix is meant as a local path.
    """
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or path.count("/") > 1
        or "\\" in path
        or _suffix(path) in _BUILDERS
    )


def _load_file(path: str, key: str) -> datasets.Dataset:
    """Load one local data file with the `datasets` builder that matches its suffix."""
    builder = _BUILDERS.get(_suffix(path))
    if builder is None:
        raise UserError(
            f"unsupported file type {os.path.basename(path)!r}: use .jsonl, .json, .parquet or .txt, "
            "or a directory written by Dataset.save_to_disk", key=key, file=path)
    if os.path.getsize(path) == 0:
        # Caught here because `datasets` fails on empty files with unhelpful internal errors.
        raise UserError("no samples: the file is empty", key=key, file=path)
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # datasets wraps parser errors (ArrowInvalid, JSON errors) in its own types
        cause = _root_cause(exc)
        if "corresponds to no data" in cause:  # how datasets reports a file without rows (e.g. blank lines)
            raise UserError("no samples: the file holds no rows", key=key, file=path) from exc
        raise UserError(f"cannot read the file as {builder}: {cause}", key=key, file=path) from exc


def _load_directory(path: str, src: DatasetSource, key: str) -> datasets.Dataset:
    """Load a `save_to_disk` directory (taking `split` from a DatasetDict) or a folder of data files."""
    if os.path.exists(os.path.join(path, "dataset_dict.json")) or os.path.exists(os.path.join(path, "state.json")):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as exc:  # e.g. a save of an empty dataset, which datasets writes but cannot read back
            raise UserError(f"cannot load {path} (written by save_to_disk): {_root_cause(exc)}; "
                            "check that it holds samples", key=key) from exc
        if isinstance(loaded, datasets.DatasetDict):
            if src.split not in loaded:
                raise UserError(
                    f"split {src.split!r} not found in {path}; it has {', '.join(sorted(loaded))}",
                    key=key.rsplit(".", 1)[0] + ".split")
            return loaded[src.split]
        return loaded
    try:
        return datasets.load_dataset(path, src.name, split=src.split)
    except Exception as exc:
        raise UserError(f"cannot load the directory {path} as a dataset: {_root_cause(exc)}", key=key) from exc


def _load_hub(src: DatasetSource, key: str) -> datasets.Dataset:
    """Load a hub dataset by name (needs network access or a warm `datasets` cache)."""
    try:
        return datasets.load_dataset(src.path, src.name, split=src.split)
    except Exception as exc:
        raise UserError(
            f"cannot load hub dataset {src.path!r} (name={src.name!r}, split={src.split!r}): {_root_cause(exc)}. "
            "If you meant a local file, give its path (e.g. ./data.jsonl)", key=key) from exc


def _root_cause(exc: BaseException) -> str:
    """The innermost error message of an exception chain: the one that names the actual problem."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0] if len(text) < 2000 else text[:2000]


def load_source(src: DatasetSource, *, key: str, resolve_path: Callable[[str], str] = lambda p: p) -> datasets.Dataset:
    """Load the rows of `src`; `key` is its recipe key (`data.train`), used to point errors at `KEY.path`.

    `resolve_path` maps `asset:NAME` to a local path (the trainer passes `kd.assets.resolve`). Raises `UserError`
    for a missing local path, an unreadable file and a dataset without rows.
    """
    path_key = f"{key}.path"
    path = os.path.expanduser(resolve_path(src.path))
    if os.path.isdir(path):
        ds = _load_directory(path, src, path_key)
    elif os.path.isfile(path):
        ds = _load_file(path, path_key)
    elif looks_like_local_path(path):
        raise UserError(f"file not found: {path}", key=path_key)
    else:
        ds = _load_hub(src, path_key)
    if not isinstance(ds, datasets.Dataset):
        raise UserError(f"{src.path} did not load as a single split (got {type(ds).__name__}); set {key}.split",
                        key=f"{key}.split")
    if len(ds) == 0:
        raise UserError(f"no samples in {path}", key=path_key)
    return ds


def require_columns(ds: datasets.Dataset, columns: dict[str, str], *, what: str) -> None:
    """Raise `UserError` for the first `{recipe key: column}` pair whose column is missing, listing those present."""
    for recipe_key, column in columns.items():
        if column not in ds.column_names:
            raise UserError(
                f"column {column!r} not found in the {what} data; it has {', '.join(ds.column_names)}. "
                f"Set {recipe_key} to one of them", key=recipe_key)
