"""Recipes: parse, select stages, apply args, validate and write compression recipes."""

from lightning_compress.recipe.errors import RecipeError
from lightning_compress.recipe.recipe import (
    Recipe,
    RecipeArgsInput,
    RecipeInput,
    RecipeStage,
    RecipeStageInput,
)
from lightning_compress.recipe.registry import (
    get_modifier_class,
    register_modifier,
    registered_modifiers,
)

__all__ = [
    "Recipe",
    "RecipeArgsInput",
    "RecipeError",
    "RecipeInput",
    "RecipeStage",
    "RecipeStageInput",
    "get_modifier_class",
    "register_modifier",
    "registered_modifiers",
]
