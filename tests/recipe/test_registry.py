"""The modifier registry: built-ins, user extensions, name clashes."""

from __future__ import annotations

import pytest

from lightning_compress.modifiers import Modifier
from lightning_compress.recipe import (
    Recipe,
    RecipeError,
    get_modifier_class,
    register_modifier,
    registered_modifiers,
)


class UserScaleModifier(Modifier):
    """A user's own modifier, registered by subclassing."""

    factor: float = 2.0


def test_subclasses_register_themselves_and_work_in_recipes():
    assert get_modifier_class("UserScaleModifier") is UserScaleModifier
    recipe = Recipe.create_instance({"u_modifiers": {"UserScaleModifier": {"factor": 3}}})
    assert recipe.modifiers[0].factor == 3.0


def test_builtins_are_registered():
    assert "QuantizationModifier" in registered_modifiers()


def test_alias_registration():
    register_modifier(UserScaleModifier, name="ScaleAlias")
    assert get_modifier_class("ScaleAlias") is UserScaleModifier


def test_a_different_class_cannot_take_a_registered_name():
    impostor = type("UserScaleModifier", (), {"__module__": "elsewhere"})
    with pytest.raises(RecipeError, match="already registered"):
        register_modifier(impostor)


def test_unregistered_subclass():
    class Private(Modifier, register=False):
        pass

    with pytest.raises(RecipeError, match="unknown modifier 'Private'"):
        get_modifier_class("Private")
