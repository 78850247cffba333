"""Checking modifier settings against their type hints, with errors that name the field."""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from lightning_compress.recipe.errors import RecipeError

__all__ = ["check_value", "describe"]


def check_value(where: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against ``hint`` and return it, converted where that is lossless.

    Integers are accepted for floats; numeric strings (YAML reads ``1e-2`` as text) are
    accepted for floats; tuples are accepted for lists.

    Args:
        where: the field's name for messages, e.g. ``GPTQModifier.block_size``.
        value: the value given.
        hint: the field's type hint (``int``, ``float | None``, ``list[str]``, ``Literal``...).

    Returns:
        The value, converted to the hinted type where needed.

    Raises:
        RecipeError: if the value does not fit; the message names the field, the value and
            the expected type.
    """
    ok, converted = _convert(value, hint)
    if not ok:
        raise RecipeError(f"{where}: expected {describe(hint)}, got {value!r}")
    return converted


def describe(hint: Any) -> str:
    """A readable name for a type hint.

    Args:
        hint: the type hint.

    Returns:
        E.g. ``'float or None'``, ``'one of ['2:4', '0:0']'``, ``'list of str'``.
    """
    origin = get_origin(hint)
    if hint is Any:
        return "any value"
    if hint is type(None):
        return "None"
    if origin is Literal:
        return f"one of {list(get_args(hint))}"
    if origin in (Union, types.UnionType):
        return " or ".join(describe(arg) for arg in get_args(hint))
    if origin is list:
        (item,) = get_args(hint) or (Any,)
        return f"list of {describe(item)}"
    if origin is dict:
        key, item = get_args(hint) or (Any, Any)
        return f"mapping of {describe(key)} to {describe(item)}"
    return getattr(hint, "__name__", str(hint))


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    origin = get_origin(hint)
    if hint is Any:
        return True, value
    if hint is type(None):
        return value is None, value
    if origin is Literal:
        return value in get_args(hint), value
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            ok, converted = _convert(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is list:
        return _convert_list(value, hint)
    if origin is dict:
        return _convert_dict(value, hint)
    return _convert_scalar(value, hint)


def _convert_list(value: Any, hint: Any) -> tuple[bool, Any]:
    if not isinstance(value, (list, tuple)):
        return False, value
    (item_hint,) = get_args(hint) or (Any,)
    items = [_convert(item, item_hint) for item in value]
    return all(ok for ok, _ in items), [item for _, item in items]


def _convert_dict(value: Any, hint: Any) -> tuple[bool, Any]:
    if not isinstance(value, dict):
        return False, value
    key_hint, item_hint = get_args(hint) or (Any, Any)
    pairs = [(_convert(k, key_hint), _convert(v, item_hint)) for k, v in value.items()]
    ok = all(k_ok and v_ok for (k_ok, _), (v_ok, _) in pairs)
    return ok, {k: v for (_, k), (_, v) in pairs}


def _convert_scalar(value: Any, hint: Any) -> tuple[bool, Any]:
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return False, value
    if isinstance(hint, type):
        return isinstance(value, hint), value
    return True, value
