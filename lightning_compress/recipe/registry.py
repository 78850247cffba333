"""Modifier classes by name, so recipes can refer to them as ``{ClassName: {...}}``."""

from __future__ import annotations

import importlib

from lightning_compress.recipe.errors import RecipeError, did_you_mean

__all__ = ["get_modifier_class", "register_modifier", "registered_modifiers"]

_REGISTRY: dict[str, type] = {}
# The package whose import registers the built-in modifiers. Loaded on first look-up so
# that recipes work without importing it first (this room sits below the modifiers).
_BUILTIN_PACKAGE = "lightning_compress.modifiers"


def register_modifier(cls: type, name: str | None = None) -> type:
    """Register a modifier class under ``name`` (its class name by default).

    Subclasses of ``Modifier`` register themselves; call this for an alias.

    Args:
        cls: the modifier class.
        name: the name recipes use.

    Returns:
        ``cls``, so this can be used as a decorator.

    Raises:
        RecipeError: if another class (from another module) already has the name.
    """
    key = name or cls.__name__
    existing = _REGISTRY.get(key)
    if existing is not None and _qualified(existing) != _qualified(cls):
        raise RecipeError(
            f"modifier name '{key}' is already registered by {_qualified(existing)}; "
            f"give {_qualified(cls)} another name"
        )
    _REGISTRY[key] = cls
    return cls


def registered_modifiers() -> list[str]:
    """The names of all registered modifiers, sorted.

    Returns:
        The names.
    """
    importlib.import_module(_BUILTIN_PACKAGE)
    return sorted(_REGISTRY)


def get_modifier_class(name: str) -> type:
    """The modifier class registered as ``name``.

    Args:
        name: the class name used in a recipe.

    Returns:
        The class.

    Raises:
        RecipeError: if no modifier has that name; the message lists the registered names
            and the closest ones.
    """
    importlib.import_module(_BUILTIN_PACKAGE)
    if name not in _REGISTRY:
        raise RecipeError(
            f"unknown modifier '{name}'; registered modifiers: {', '.join(sorted(_REGISTRY))}"
            + did_you_mean([name], _REGISTRY)
        )
    return _REGISTRY[name]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
