"""Every recipe in recipes/ (found recursively) validates, and every key in it carries a comment."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from kd.config import load_recipe
from kd.config.schema import Recipe

RECIPES = sorted((Path(__file__).resolve().parents[3] / "recipes").rglob("*.yaml"))


def test_recipes_found():
    assert len(RECIPES) >= 3


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_validates(path):
    assert isinstance(load_recipe(str(path)), Recipe)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_key_is_commented(path):
    uncommented = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        # a "key: value" line (not a section header, list item or comment) must say what it does
        if re.match(r"^\s*[a-z_0-9]+:\s*\S", line) and "#" not in line:
            uncommented.append(f"{path.name}:{number}: {line.strip()}")
    assert not uncommented, "\n".join(uncommented)
