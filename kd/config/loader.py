"""Recipe YAML -> validated `Recipe`, with `base:` inheritance, `key.path=value` overrides and one-line errors.

Every way a recipe can be wrong ends in a `UserError` that names the file and the dotted key, e.g.
``recipes/x.yaml: loss.temperature: expected a number, got 'hot'``; schema problems are reported all at once, one
line each, with the likely key for a misspelt one (``loss.temprature: unknown key; did you mean temperature?``).

Inheritance: a top-level ``base: other.yaml`` (relative to the file that names it) loads that recipe first, itself
resolved the same way, and merges this file over it. Mappings merge key by key; lists, scalars and ``null`` replace
what the base had (``null`` is a value like any other: on the keys whose default is null, such as ``loss.trg`` or
``student.init_from_teacher_layers``, it switches off what the base set; a key whose default is not null cannot be
reset to its default this way, write the value). Overrides apply last. The merged recipe has no ``base`` key: it is
what gets validated, and what `dump_recipe` writes into run directories and checkpoints. While merging, the loader
remembers which file wrote each key, so an error names the file to fix, not just the top recipe.
"""
from __future__ import annotations

import copy
import difflib
import os
from typing import Any, Iterable, Optional

import yaml
from pydantic import BaseModel, ValidationError

from kd.config.schema import Recipe
from kd.errors import UserError

BASE_KEY = "base"
KeyPath = tuple[Any, ...]  # a key path into the raw recipe: ("loss", "taid", "alpha")
Sources = dict[KeyPath, str]  # key path -> the file (or "FILE (with overrides)") that last wrote it


def load_recipe(path: str, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe and its base chain, apply overrides, validate."""
    raw, sources = resolve(path)
    for item in overrides:
        apply_override(raw, item, file=path + " (with overrides)", sources=sources)
    return validate(raw, file=path, sources=sources)


def resolve(path: str) -> tuple[dict[str, Any], Sources]:
    """The recipe at `path` merged over its bases (no ``base`` key left), and which file wrote each key path."""
    merged: dict[str, Any] = {}
    sources: Sources = {}
    for file, data in reversed(_chain(path)):  # the root-most base first, `path` last
        _merge(merged, data, file, (), sources)
    return merged, sources


def _chain(path: str) -> list[tuple[str, dict[str, Any]]]:
    """[(file, its mapping without ``base``)] from `path` down to the recipe with no base."""
    chain: list[tuple[str, dict[str, Any]]] = []
    file, data = path, read_yaml(path)
    while True:
        base = data.pop(BASE_KEY, None)
        chain.append((file, data))
        if base is None:
            return chain
        if not isinstance(base, str) or not base.strip():
            raise UserError(f"expected the path of another recipe file, got {base!r}", key=BASE_KEY, file=file)
        target = os.path.normpath(os.path.join(os.path.dirname(file), os.path.expanduser(base.strip())))
        seen = [os.path.realpath(f) for f, _ in chain]
        if os.path.realpath(target) in seen:
            loop = [f for f, _ in chain[seen.index(os.path.realpath(target)):]] + [target]
            raise UserError(f"recipes inherit from each other in a cycle: {' -> '.join(loop)}", key=BASE_KEY, file=file)
        try:
            data = read_yaml(target)
        except UserError as e:  # the fix is in `file`'s base line, or in the base file it names
            raise UserError(f"{target}: {e.message}", key=BASE_KEY, file=file) from None
        file = target


def _merge(dst: dict[str, Any], src: dict[str, Any], file: str, prefix: KeyPath, sources: Sources) -> None:
    """Merge `src` (written in `file`) over `dst` in place: mappings key by key, anything else replaces."""
    for key, value in src.items():
        path = prefix + (key,)
        if isinstance(value, dict) and isinstance(dst.get(key), dict):
            _merge(dst[key], value, file, path, sources)
        else:
            dst[key] = copy.deepcopy(value)  # YAML anchors may share objects; later merges must not alias
            _forget_below(sources, path)
            _record_below(value, file, path, sources)
        sources[path] = file  # the top-most file that mentions a section answers for the section as a whole


def _record_below(value: Any, file: str, prefix: KeyPath, sources: Sources) -> None:
    """Record that `file` wrote every key inside the section `value` (a later file may merge over some of them)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            sources[prefix + (key,)] = file
            _record_below(inner, file, prefix + (key,), sources)


def _forget_below(sources: Sources, path: KeyPath) -> None:
    for old in [p for p in sources if len(p) > len(path) and p[:len(path)] == path]:
        del sources[old]


def _source_of(loc: Iterable[Any], sources: Optional[Sources]) -> Optional[str]:
    """The file that wrote the longest prefix of `loc`, or None (a missing key, an error on the whole recipe)."""
    loc = tuple(loc)
    for end in range(len(loc), 0, -1):
        found = (sources or {}).get(loc[:end])
        if found is not None:
            return found
    return None


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError("recipe file not found", file=path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"malformed YAML: {where}{problem}", file=path) from None
    except UnicodeDecodeError:
        raise UserError("recipe is not UTF-8 text", file=path) from None
    except OSError as e:
        raise UserError(f"cannot read the recipe ({e.strerror or e})", file=path) from None
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections (run:, teacher:, ...)", file=path)
    return data


def apply_override(raw: dict[str, Any], item: str, *, file: str, sources: Optional[Sources] = None) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3`` -> int, ``[0,1]`` -> list).

    `file` is what errors about this override name; `sources`, when given, records that it wrote the key.
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {item!r} must look like key.path=value", file=file)
    if key.split(".")[0] == BASE_KEY:
        raise UserError("base is read from the recipe file before overrides apply; set it there", key=key, file=file)
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"cannot set {key}: {'.'.join(parts[:depth + 1])} is not a section", key=key, file=file)
        node = child
    node[parts[-1]] = value
    if sources is not None:
        _forget_below(sources, tuple(parts))
        for end in range(1, len(parts) + 1):  # like a file merged on top: it answers for the sections it touched
            sources[tuple(parts[:end])] = file


def validate(raw: dict[str, Any], *, file: str, sources: Optional[Sources] = None) -> Recipe:
    """Validate a raw (merged, overridden) recipe. Every problem is reported at once (one `UserError` carrying them
    all, one line each), each naming the file that wrote the offending key when `sources` knows it, else `file`."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        by_key: dict[KeyPath, dict[str, Any]] = {}
        for error in e.errors():
            # the alternatives of a union (`resume: auto | never | str`) each report an error for the same key; the
            # last alternative is the most general one, so its message is the one to show (dicts keep first order)
            by_key[_key_path(error)] = error
        problems = [UserError(describe(error), key=".".join(str(p) for p in loc) or None,
                              file=_source_of(loc, sources) or file)
                    for loc, error in by_key.items()]
        raise UserError.several(problems) from None


def _key_path(error: dict[str, Any]) -> KeyPath:
    """The recipe key an error belongs to: its pydantic `loc` without the union tags pydantic adds
    (``('resume', "literal['auto','never']")`` -> ``('resume',)``)."""
    model: Any = Recipe
    path: list[Any] = []
    loc = tuple(error["loc"])
    for depth, part in enumerate(loc):
        fields = model.model_fields if model is not None else {}
        if isinstance(part, str) and part in fields:
            path.append(part)
            model = _model_of(fields[part].annotation)
        elif isinstance(part, int) or (error["type"] == "extra_forbidden" and depth == len(loc) - 1):
            path.append(part)  # a list index, or the unknown key itself
            model = None
        # else: a union tag, not a key
    return tuple(path)


# pydantic error type -> what the key wanted, for "expected X, got Y"
_EXPECTED = {
    **dict.fromkeys(("float_parsing", "float_type"), "a number"),
    **dict.fromkeys(("int_parsing", "int_type", "int_from_float"), "an integer"),
    **dict.fromkeys(("bool_parsing", "bool_type"), "true or false"),
    "string_type": "a string",
    **dict.fromkeys(("dict_type", "model_type", "model_attributes_type"), "a section (mapping)"),
    **dict.fromkeys(("list_type", "tuple_type"), "a list"),
}


def describe(error: dict[str, Any]) -> str:
    """Turn one pydantic error into a short sentence a user can act on."""
    kind, value = error["type"], error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        valid = _valid_keys(error["loc"][:-1])
        near = difflib.get_close_matches(str(error["loc"][-1]), valid, n=1, cutoff=0.7)
        if near:  # a typo: the one key meant is more help than the whole list
            return f"unknown key; did you mean {near[0]}?"
        return "unknown key" + (f" (valid keys: {', '.join(valid)})" if valid else "")
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {shown}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        message = message.removeprefix(prefix)
    message = message.replace("Input should be", "must be")
    return message if kind == "value_error" else f"{message}, got {shown}"


def _valid_keys(loc: tuple) -> list[str]:
    """Keys allowed at ``loc`` (a path into the schema), for the unknown-key message."""
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = _model_of(field.annotation)
        if model is None:
            return []
    return list(model.model_fields)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (every default filled in), as written into the run directory and checkpoints."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
