"""Remembering how a block was called during calibration, to run it again on the same inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from lightning_compress.core.tensors import map_tensors, tensor_version

__all__ = ["CallRecorder", "RecordedCall", "tensors_in"]


@dataclass
class RecordedCall:
    """The arguments of one call of a module (references to the tensors, not copies).

    Args:
        args: the positional arguments.
        kwargs: the keyword arguments.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        self._versions = [tensor_version(t) for t in tensors_in((self.args, self.kwargs))]

    def first_sample(self) -> RecordedCall:
        """The same call on the first sample of the batch only.

        The batch size is the first dimension of the first tensor argument; every tensor of
        two or more dimensions that starts with it is cut to its first row (hidden states,
        masks, positions), the others are kept (``cache_position``, broadcast tables).

        Returns:
            The narrowed call (``self`` for a batch of one).
        """
        tensors = tensors_in(self.args) or tensors_in(self.kwargs)
        batch = tensors[0].shape[0] if tensors and tensors[0].dim() >= 2 else 1
        if batch <= 1:
            return self

        def cut(tensor: Tensor) -> Tensor:
            return tensor[:1] if tensor.dim() >= 2 and tensor.shape[0] == batch else tensor

        return RecordedCall(map_tensors(self.args, cut), map_tensors(self.kwargs, cut))

    def replay(self, module: nn.Module) -> Any:
        """Calls ``module`` again with the recorded arguments.

        Args:
            module: the module (the one recorded, possibly with other weights).

        Returns:
            What the module returns.

        Raises:
            RuntimeError: when a recorded tensor was modified in place since the call.
        """
        versions = [tensor_version(t) for t in tensors_in((self.args, self.kwargs))]
        if versions != self._versions:
            raise RuntimeError(
                f"the inputs of a {type(module).__name__} were modified in place after its "
                "calibration forward; smoothing needs them as the module saw them"
            )
        return module(*self.args, **self.kwargs)


class CallRecorder:
    """Keeps the latest *outermost* call of the modules it watches.

    A call is outermost when no other watched module is running: the block the sequential
    pipeline calls, or the whole model under the basic pipeline. Calls nested inside it are
    not kept, so only one batch's arguments stay referenced per outermost module.

    Register :meth:`pre_hook` (``with_kwargs=True``) and :meth:`post_hook`
    (``always_call=True``) on every watched module.
    """

    def __init__(self) -> None:
        self._calls: dict[nn.Module, RecordedCall] = {}
        self._running: list[nn.Module] = []

    def pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Records the call when it is outermost.

        Args:
            module: the called module.
            args: its positional arguments.
            kwargs: its keyword arguments.
        """
        if not self._running:
            self._calls[module] = RecordedCall(args, dict(kwargs))
        self._running.append(module)

    def post_hook(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """Marks the call as finished (also after an exception).

        Args:
            module: the module.
            args: its positional arguments.
            output: what it returned.
        """
        if self._running and self._running[-1] is module:
            self._running.pop()

    def take(self, module: nn.Module) -> RecordedCall | None:
        """The latest outermost call of ``module``, forgotten here.

        Args:
            module: the module.

        Returns:
            The call, or None when ``module`` had no outermost call.
        """
        return self._calls.pop(module, None)

    def clear(self) -> None:
        """Forgets every call."""
        self._calls.clear()
        self._running.clear()


def tensors_in(value: Any) -> list[Tensor]:
    """The tensors inside nested tuples, lists and mappings (a ``ModelOutput`` too), in order.

    Args:
        value: a tensor, a container of them, or anything else.

    Returns:
        The tensors.
    """
    found: list[Tensor] = []
    map_tensors(value, lambda tensor: found.append(tensor) or tensor)
    return found
