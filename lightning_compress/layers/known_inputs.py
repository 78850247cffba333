"""Layers a module calls on inputs it has all computed before calling the first of them.

A mixture's experts read different tokens, but none reads another's output: the experts
module computes every expert's input first, then calls their layers one expert after another.
Declaring those inputs (:func:`inputs_known_ahead`) lets a pipeline that pauses before a group
of layers (the staged calibration) take the whole group at once: it reads every declared
layer's input at the first call instead of waiting for each layer's own call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor, nn

__all__ = ["inputs_known_ahead", "known_inputs"]

_KNOWN: ContextVar[Mapping[int, Tensor] | None] = ContextVar("known_inputs", default=None)


@contextmanager
def inputs_known_ahead(inputs: Sequence[tuple[nn.Module, Tensor]]) -> Iterator[None]:
    """Declares, for the body, the input each of some layers will be called on.

    Declarations are per context (each greenlet or thread its own); an inner one replaces an
    outer one for its body.

    Args:
        inputs: ``(layer, x)``: the body calls ``layer(x)``, each layer once.
    """
    token = _KNOWN.set({id(layer): x for layer, x in inputs})
    try:
        yield
    finally:
        _KNOWN.reset(token)


def known_inputs() -> Mapping[int, Tensor] | None:
    """The inputs declared by the innermost :func:`inputs_known_ahead` of this context.

    Returns:
        Each declared layer's input, by ``id(layer)`` (one mapping object per declaration),
        or None outside any declaration.
    """
    return _KNOWN.get()
