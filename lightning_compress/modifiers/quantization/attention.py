"""Routing a model's attention through a handler that sees its queries, keys and values.

A transformers 5 attention module projects the hidden states to queries, keys and values,
applies the rotary embedding, updates the cache, then calls
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)``
with ``(module, query, key, value, ...)``, keys and values ``[batch, kv_heads, tokens,
head_dim]`` (before any repetition for grouped-query attention). :class:`AttentionRouting`
registers, for the implementation a model uses (``sdpa``, ``eager``, ``flash_attention_2``
...), a wrapping implementation ``lightning_compress_<implementation>`` (and the same mask
function under that name), switches the attention modules' configs to it, and sends each
call of a routed module through its handler before the original implementation runs; a
module that shares the config but is not routed runs unchanged. ``remove`` restores the
configs and, once no config uses them, unregisters both names: nothing is left behind.

The handler sees the keys and values exactly as the cache stores them (after the rotary
embedding) and the queries as attention reads them. With a cache the keys and values
passed on hold earlier tokens too (quantizing them again with the same scales changes
nothing they held already quantized).
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

__all__ = [
    "IMPLEMENTATION_PREFIX",
    "AttentionRouting",
    "attention_modules",
    "is_attention_module",
    "registered_implementations",
]

IMPLEMENTATION_PREFIX = "lightning_compress_"
"""Prefix of the attention implementations this module registers while it routes attention."""

PROJECTIONS = ("k_proj", "v_proj", "qkv_proj", "kv_proj", "kv_b_proj", "c_attn", "query_key_value")
"""Children by which an attention module (one that computes keys and values) is recognized."""
CACHE_PARAMETERS = ("cache", "past_key_values", "past_key_value", "layer_past")
"""Parameters by which an attention module's forward takes the KV cache."""

Handler = Callable[[nn.Module, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]

_ROUTES: weakref.WeakKeyDictionary[nn.Module, Handler] = weakref.WeakKeyDictionary()
_USERS: dict[str, int] = {}  # registered name -> configs switched to it


def is_attention_module(module: nn.Module) -> bool:
    """Whether ``module`` is an attention layer whose keys and values a KV cache holds.

    Args:
        module: any module.

    Returns:
        True when its class name contains ``Attention``, it has a key/value projection (one
        of :data:`PROJECTIONS`) and its forward takes a cache (one of
        :data:`CACHE_PARAMETERS`; a vision encoder's attention takes none).
    """
    if "attention" not in type(module).__name__.lower():
        return False
    if not any(isinstance(getattr(module, name, None), nn.Module) for name in PROJECTIONS):
        return False
    parameters = inspect.signature(type(module).forward).parameters
    return any(name in parameters for name in CACHE_PARAMETERS)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention layers of ``model`` (:func:`is_attention_module`), outermost only.

    Args:
        model: the model.

    Returns:
        Name to module, in module order.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        inside = any(name.startswith(f"{outer}.") for outer in found)
        if not inside and is_attention_module(module):
            found[name] = module
    return found


def _interfaces() -> tuple[Any, Any]:
    """transformers' attention and mask interfaces (imported when needed: transformers is an
    optional dependency of the package)."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS


def _original_implementation(name: str, module: nn.Module) -> Callable[..., Any]:
    """The implementation ``name`` as ``module``'s forward would call it."""
    attention_functions, _ = _interfaces()
    if name in attention_functions:
        return attention_functions[name]
    return sys.modules[type(module).__module__].eager_attention_forward


def _routed_attention(
    original: str, module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args, **kwargs
) -> Any:
    """The registered implementation: the module's handler (if routed), then ``original``."""
    handler = _ROUTES.get(module)
    if handler is not None:
        query, key, value = handler(module, query, key, value)
    return _original_implementation(original, module)(module, query, key, value, *args, **kwargs)


def _unhookable(module: nn.Module) -> str | None:
    """Why ``module``'s attention cannot be routed, or None when it can."""
    attention_functions, mask_functions = _interfaces()
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if not isinstance(implementation, str):
        return "it has no transformers config naming its attention implementation"
    namespace = vars(sys.modules[type(module).__module__])
    if namespace.get("ALL_ATTENTION_FUNCTIONS") is not attention_functions:
        return "its forward does not call transformers' AttentionInterface"
    if implementation.startswith(IMPLEMENTATION_PREFIX):
        return "its attention is routed already (by another modifier or quantized_attention)"
    if implementation not in attention_functions and "eager_attention_forward" not in namespace:
        return f"its module defines no eager_attention_forward for {implementation!r}"
    if implementation not in mask_functions:
        return f"transformers has no mask function for {implementation!r}"
    return None


class AttentionRouting:
    """Sends the attention calls of ``modules`` through ``handler`` until :meth:`remove`.

    Args:
        modules: attention modules by name.
        handler: ``handler(module, query, key, value) -> (query, key, value)``.

    Raises:
        ValueError: when a module's attention cannot be routed (a module that computes
            attention itself instead of calling transformers' ``AttentionInterface``, or has
            no transformers config); the message names every such module and its class.
            Nothing is changed then.
    """

    def __init__(self, modules: Mapping[str, nn.Module], handler: Handler) -> None:
        refused = {name: why for name, module in modules.items() if (why := _unhookable(module))}
        if refused:
            listed = "; ".join(
                f"'{name}' ({type(modules[name]).__name__}): {why}" for name, why in refused.items()
            )
            raise ValueError(
                f"cannot quantize the attention of {listed}; expected transformers 5 attention "
                "modules that call ALL_ATTENTION_FUNCTIONS (or leave the kv_cache_scheme and "
                "attention groups out for this model)"
            )
        self._modules = list(modules.values())
        self._configs: list[tuple[Any, str]] = []
        try:
            for module in self._modules:
                if not any(config is module.config for config, _ in self._configs):
                    self._switch(module.config)
                _ROUTES[module] = handler
        except BaseException:
            self.remove()
            raise

    def _switch(self, config: Any) -> None:
        attention_functions, mask_functions = _interfaces()
        original = config._attn_implementation
        name = f"{IMPLEMENTATION_PREFIX}{original}"
        if _USERS.get(name, 0) == 0:
            attention_functions.register(name, functools.partial(_routed_attention, original))
            mask_functions.register(name, mask_functions[original])
        _USERS[name] = _USERS.get(name, 0) + 1
        self._configs.append((config, original))
        config._attn_implementation = name

    def remove(self) -> None:
        """Restores the configs, forgets the handlers and unregisters unused implementations.

        Calling it again does nothing.
        """
        for module in self._modules:
            _ROUTES.pop(module, None)
        self._modules = []
        for config, original in reversed(self._configs):
            name = f"{IMPLEMENTATION_PREFIX}{original}"
            config._attn_implementation = original
            _USERS[name] -= 1
            if _USERS[name] == 0:
                del _USERS[name]
                for interface in _interfaces():  # transformers has no unregister
                    type(interface)._global_mapping.pop(name, None)
        self._configs = []


def registered_implementations() -> list[str]:
    """The implementations this module has registered and not yet removed (for checks).

    Returns:
        Their names.
    """
    attention_functions, _ = _interfaces()
    return [name for name in attention_functions if name.startswith(IMPLEMENTATION_PREFIX)]
