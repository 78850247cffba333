"""What a block was before its compression event: to restore it, compare it, replay it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

__all__ = ["BlockSnapshot", "BlockVersions", "hook_keys", "hooks_suspended"]

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")
# Dicts keyed like the hook dicts that hold a hook's registration flags.
_HOOK_FLAGS = (
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class BlockSnapshot:
    """A CPU copy of a block's tensors and the list of its hooks, attributes and submodule
    classes.

    Taken before a block is calibrated, it lets the pipeline put the block back when
    anything fails half way, tell whether compression changed the block's forward (so the
    calibration outputs can be reused), and replay the compressed block without the hooks
    that observed its calibration.

    Args:
        block: the block.
    """

    def __init__(self, block: nn.Module) -> None:
        self.tensors = {name: t.detach().to("cpu", copy=True) for name, t in _tensors(block)}
        self.structure = _structure(block)
        self.hooks = hook_keys(block)
        self.slots = {name: _slots(module) for name, module in block.named_modules()}

    @property
    def observed(self) -> bool:
        """Whether any hook (an observer of the calibration forward) is on the block."""
        return bool(self.hooks)

    def changed(self, block: nn.Module) -> bool:
        """Whether the block's forward may differ from the snapshot's.

        It does when a tensor's value, shape or name differs, a submodule was replaced by
        another class, or a hook was added. Removed hooks do not count: hooks present during
        calibration observe it and must not change the block's outputs.

        Args:
            block: the block.

        Returns:
            True if the block may compute something else than before.
        """
        current = dict(_tensors(block))
        if current.keys() != self.tensors.keys() or _structure(block) != self.structure:
            return True
        if not hook_keys(block) <= self.hooks:
            return True
        return not all(
            tensor.shape == self.tensors[name].shape
            and torch.equal(tensor.detach().cpu(), self.tensors[name])
            for name, tensor in current.items()
        )

    def restore(self, block: nn.Module) -> None:
        """Put the block back as the snapshot saw it.

        The snapshot's values go back into the tensors of the same names, and every
        parameter, buffer, forward hook and public attribute added to a submodule since is
        removed (scales, zero points, a quantized forward, ``quantization_scheme``).

        Args:
            block: the block.
        """
        with torch.no_grad():
            for name, tensor in _tensors(block):
                saved = self.tensors.get(name)
                if saved is not None:
                    tensor.set_(saved.to(tensor.device))
        for name, module in block.named_modules():
            if name in self.slots:
                self._drop_additions(name, module)

    def _drop_additions(self, name: str, module: nn.Module) -> None:
        parameters, buffers, attributes = self.slots[name]
        for key in [key for key in module._parameters if key not in parameters]:
            del module._parameters[key]
        for key in [key for key in module._buffers if key not in buffers]:
            del module._buffers[key]
            module._non_persistent_buffers_set.discard(key)
        for key in [key for key in vars(module) if key not in attributes]:
            if not key.startswith("_"):
                del vars(module)[key]
        for attribute in _HOOK_DICTS:
            hooks = getattr(module, attribute)
            for key in [key for key in hooks if (name, attribute, key) not in self.hooks]:
                del hooks[key]
                for flags in _HOOK_FLAGS:
                    getattr(module, flags).pop(key, None)

    def hooks_suspended(
        self, block: nn.Module, modules: Iterable[nn.Module] | None = None
    ) -> AbstractContextManager[None]:
        """Inside the context the recorded (calibration) hooks do not run; others do.

        Hooks added inside the context stay; the suspended ones are put back in their places.

        Args:
            block: the block.
            modules: suspend only the hooks of these submodules; None: of all of them.

        Returns:
            The context.
        """
        return hooks_suspended(block, self.hooks, modules)


@contextmanager
def hooks_suspended(
    root: nn.Module,
    keys: set[tuple[str, str, int]] | None = None,
    modules: Iterable[nn.Module] | None = None,
) -> Iterator[None]:
    """Inside the context the chosen forward hooks of ``root``'s submodules do not run.

    Hooks added inside the context stay; the suspended ones are put back in their places.

    Args:
        root: the module whose submodules' hooks are suspended.
        keys: ``(submodule name, hook dict, hook id)`` of the hooks to suspend (a snapshot's
            ``hooks``); None: every hook present on entry.
        modules: suspend only the hooks of these submodules; None: of all of them.

    Yields:
        Nothing.
    """
    keys = hook_keys(root) if keys is None else keys
    chosen = None if modules is None else {id(module) for module in modules}
    suspended = []
    for module_name, module in root.named_modules():
        if chosen is not None and id(module) not in chosen:
            continue
        for attribute in _HOOK_DICTS:
            hooks = getattr(module, attribute)
            order = list(hooks)
            removed = {
                key: hooks.pop(key) for key in order if (module_name, attribute, key) in keys
            }
            if removed:
                suspended.append((hooks, order, removed))
    try:
        yield
    finally:
        for hooks, order, removed in reversed(suspended):
            current = dict(hooks)
            hooks.clear()
            for key in order:
                if key in removed or key in current:
                    hooks[key] = removed.get(key, current.get(key))
            hooks.update({key: hook for key, hook in current.items() if key not in hooks})


class BlockVersions:
    """A cheap record of a block's state: tensor identities and in-place versions, submodule
    classes and hooks. Unlike :class:`BlockSnapshot` it copies nothing and cannot restore.

    Args:
        block: the block.
    """

    def __init__(self, block: nn.Module) -> None:
        self.tensors = _versions(block)
        self.structure = _structure(block)
        self.hooks = hook_keys(block)

    def changed(self, block: nn.Module) -> bool:
        """Whether the block's forward may differ: a tensor replaced or modified in place, a
        submodule replaced, or a hook added (removed hooks do not count).

        Args:
            block: the block.

        Returns:
            True if the block may compute something else than when recorded.
        """
        return (
            _versions(block) != self.tensors
            or _structure(block) != self.structure
            or not hook_keys(block) <= self.hooks
        )


def _versions(block: nn.Module) -> dict[str, tuple[int, int]]:
    return {
        name: (id(tensor), 0 if tensor.is_inference() else tensor._version)
        for name, tensor in _tensors(block)
    }


def _tensors(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*block.named_parameters(), *block.named_buffers()]


def _structure(block: nn.Module) -> list[tuple[str, type]]:
    return [(name, type(module)) for name, module in block.named_modules()]


def _slots(module: nn.Module) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """The names of a module's own parameters, buffers and attributes."""
    return frozenset(module._parameters), frozenset(module._buffers), frozenset(vars(module))


def hook_keys(block: nn.Module) -> set[tuple[str, str, int]]:
    """The forward hooks on ``block`` and its submodules.

    Args:
        block: the module.

    Returns:
        ``(submodule name, hook dict, hook id)`` of each forward (pre-)hook.
    """
    return {
        (name, attribute, key)
        for name, module in block.named_modules()
        for attribute in _HOOK_DICTS
        for key in getattr(module, attribute)
    }
