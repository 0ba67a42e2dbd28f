"""Recipe YAML -> validated `Recipe`, with `key.path=value` overrides and one-line error messages.

Every way a recipe can be wrong ends in a `UserError` that names the file and the dotted key, e.g.
``recipes/x.yaml: loss.temperature: expected a number, got 'hot'``.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import yaml
from pydantic import BaseModel, ValidationError

from kd.config.schema import Recipe
from kd.errors import UserError


def load_recipe(path: str, overrides: Iterable[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    raw = read_yaml(path)
    overrides = list(overrides)
    for item in overrides:
        apply_override(raw, item, file=path)
    return validate(raw, file=path + (" (with overrides)" if overrides else ""))


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
    if not isinstance(data, dict):
        raise UserError("a recipe must be a mapping of sections (run:, teacher:, ...)", file=path)
    return data


def apply_override(raw: dict[str, Any], item: str, *, file: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value is parsed as YAML (``3`` -> int, ``[0,1]`` -> list)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"override {item!r} must look like key.path=value", file=file)
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


def validate(raw: dict[str, Any], *, file: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        first = errors[0]
        key = ".".join(str(p) for p in first["loc"])
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise UserError(describe(first) + more, key=key or None, file=file) from None


def describe(error: dict[str, Any]) -> str:
    """Turn one pydantic error into a short sentence a user can act on."""
    kind, value = error["type"], error.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        valid = _valid_keys(error["loc"][:-1])
        return "unknown key" + (f" (valid keys: {', '.join(valid)})" if valid else "")
    if kind in ("float_parsing", "float_type"):
        return f"expected a number, got {shown}"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return f"expected an integer, got {shown}"
    if kind in ("bool_parsing", "bool_type"):
        return f"expected true or false, got {shown}"
    if kind in ("string_type",):
        return f"expected a string, got {shown}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"expected a section (mapping), got {shown}"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list, got {shown}"
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
