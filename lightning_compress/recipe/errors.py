"""The error raised for bad recipes and bad modifier settings, and the hint for misspelled names."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["RecipeError", "did_you_mean"]


class RecipeError(ValueError):
    """A recipe or modifier setting is invalid; the message names the place and the fix."""


def did_you_mean(names: Iterable[str], valid: Iterable[str], ignore_case: bool = False) -> str:
    """A hint naming the valid names closest to each misspelled one, for an error message.

    Args:
        names: the names that were not recognised.
        valid: the names that would have been.
        ignore_case: compare without case (for names read in any case, like preset schemes).

    Returns:
        ``"; did you mean 'W4A16', 'W4A8' or 'W8A16'?"`` for one name (three suggestions, more
        where further names are as close as the third), ``"; did you mean 'targets' for
        'targts', 'ignore' for 'ignor'?"`` for several (the closest for each), or ``""`` when
        nothing valid is close.
    """
    fold = str.upper if ignore_case else str
    by_key = {fold(str(name)): str(name) for name in valid}
    names = [str(name) for name in names]
    # One misspelled name gets up to three suggestions, several get the closest one each.
    count = 3 if len(names) == 1 else 1
    hints = {}
    for name in names:
        close = difflib.get_close_matches(fold(name), list(by_key), n=len(by_key), cutoff=0.6)
        if len(close) > count:  # keep the names as close as the last one kept
            last = _similarity(close[count - 1], fold(name))
            close = close[:count] + [
                key for key in close[count:] if _similarity(key, fold(name)) == last
            ]
        if close:
            hints[name] = [repr(by_key[key]) for key in close]
    if not hints:
        return ""
    if len(names) == 1:
        (close,) = hints.values()
        alternatives = ", ".join(close[:-1]) + " or " + close[-1] if len(close) > 1 else close[0]
        return f"; did you mean {alternatives}?"
    return "; did you mean " + ", ".join(f"{c[0]} for {n!r}" for n, c in hints.items()) + "?"


def _similarity(candidate: str, name: str) -> float:
    """The similarity ``difflib.get_close_matches`` ranks ``candidate`` by for ``name``."""
    return difflib.SequenceMatcher(None, candidate, name).ratio()
