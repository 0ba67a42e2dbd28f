"""Recipes: schema (`kd.config.schema`) and loading with overrides (`kd.config.loader`)."""
from kd.config.loader import dump_recipe, load_recipe
from kd.config.schema import Recipe

__all__ = ["Recipe", "dump_recipe", "load_recipe"]
