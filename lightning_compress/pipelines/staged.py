"""Calibrating a block in one forward: its layers compressed group by group on the way.

When every modifier compresses each layer from that layer's own inputs (GPTQ, SparseGPT,
Wanda, round-to-nearest; see ``Modifier.staged_layers``), the sequential pipeline does not
need a calibration forward and then a second forward of the compressed block. Each
calibration batch runs through the block in its own greenlet, and pauses right before each
*stage*: the layers that read one input tensor (``q/k/v_proj``, ``gate/up_proj``). Once every
batch has reached a stage, SEQUENTIAL_EPOCH_END with a subgraph holding just that stage's
layers compresses them, and the batches go on through the compressed layers. The block's
outputs are then the compressed block's, from one forward per batch, and each layer is
calibrated on inputs that the block's earlier, already compressed layers produced.

Only one batch runs at a time; the others wait, so the statistics are gathered in batch
order as in a plain forward. A probe forward of the first batch, with the calibration hooks
suspended, finds the stages (of the first block, then of any block built unlike the last one
probed: blocks built alike reuse them). At a stage, the first layer's calibration hooks run as
in any forward; the other layers' are replayed on the same input before the batch pauses (the
probe showed that they read it), and once the stage is compressed its layers' remaining
calibration hooks are suspended until the block ends, so every hook sees each batch once.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from greenlet import getcurrent, greenlet
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.distributed import all_reduce_max_, all_reduce_min_, is_distributed
from lightning_compress.core.tensors import same_input
from lightning_compress.pipelines.capture import BlockInputs
from lightning_compress.pipelines.snapshot import BlockSnapshot

__all__ = ["Stage", "StageFinder", "StagedForward", "agree_on_stages", "find_stages"]


@dataclass(frozen=True)
class Stage:
    """Layers of a block that read one input tensor, in the order the block calls them.

    Args:
        layers: the layers; the batches pause before the first.
        names: their names inside the block.
    """

    layers: tuple[nn.Module, ...]
    names: tuple[str, ...]


def find_stages(
    block: nn.Module, layers: Sequence[nn.Module], inputs: BlockInputs, snapshot: BlockSnapshot
) -> list[Stage] | None:
    """Runs ``block`` on one batch, calibration hooks suspended, and groups ``layers`` into stages.

    Args:
        block: the block.
        layers: the layers the modifiers compress stage by stage.
        inputs: one batch's inputs, on the block's device.
        snapshot: the block's state before calibration (which hooks to suspend).

    Returns:
        The stages in call order (layers the batch did not reach are in none), or None when
        some layer ran twice or took no tensor input: the block cannot run in stages.
    """
    names = {id(module): name for name, module in block.named_modules()}
    calls: list[tuple[nn.Module, Any]] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((module, args[0] if args else next(iter(kwargs.values()), None)))

    with snapshot.hooks_suspended(block), torch.no_grad():
        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        try:
            block(*inputs.args, **inputs.kwargs)
        finally:
            for handle in handles:
                handle.remove()
    called = [id(module) for module, _ in calls]
    if len(set(called)) != len(called) or not all(isinstance(x, torch.Tensor) for _, x in calls):
        return None
    groups: list[tuple[list[nn.Module], torch.Tensor]] = []
    for module, x in calls:
        if groups and same_input(groups[-1][1], x):
            groups[-1][0].append(module)
        else:
            groups.append(([module], x))
    return [Stage(tuple(group), tuple(names[id(m)] for m in group)) for group, _ in groups]


class StageFinder:
    """Finds each block's stages, probing only a block built unlike the last one probed.

    Decoder layers are built alike (the same modules of the same types under the same names)
    and run their layers the same way, so the stages probed on one block are mapped by name
    onto the next ones instead of probing each (a probe is a forward of one batch). The staged
    forward still checks, on every batch, that a stage's layers read one input.
    """

    def __init__(self) -> None:
        self._probed: tuple[Any, ...] | None = None
        self._names: list[tuple[str, ...]] | None = None

    def find(
        self,
        block: nn.Module,
        layers: Sequence[nn.Module],
        inputs: Callable[[], BlockInputs],
        snapshot: BlockSnapshot,
    ) -> list[Stage] | None:
        """The stages of ``block`` (see :func:`find_stages`).

        Args:
            block: the block.
            layers: the layers the modifiers compress stage by stage.
            inputs: gives one batch's inputs on the block's device, for a probe.
            snapshot: the block's state before calibration.

        Returns:
            The stages in call order, or None when the block cannot run in stages.
        """
        modules = dict(block.named_modules())
        names = {id(module): name for name, module in modules.items()}
        built = (
            tuple((name, type(module)) for name, module in modules.items()),
            frozenset(names[id(layer)] for layer in layers),
        )
        if built != self._probed:
            stages = find_stages(block, layers, inputs(), snapshot)
            self._probed = built
            self._names = None if stages is None else [stage.names for stage in stages]
            return stages
        if self._names is None:
            return None
        return [Stage(tuple(modules[name] for name in group), group) for group in self._names]


def agree_on_stages(stages: list[Stage] | None) -> list[Stage] | None:
    """``stages`` if every rank found the same ones, else None on every rank (a collective).

    Args:
        stages: this rank's stages, or None when it cannot run the block in stages.

    Returns:
        The stages, or None.
    """
    if not is_distributed():
        return stages
    signature = -1 if stages is None else zlib.crc32(repr([s.names for s in stages]).encode())
    low = all_reduce_min_(torch.tensor([signature], dtype=torch.long)).item()
    high = all_reduce_max_(torch.tensor([signature], dtype=torch.long)).item()
    return stages if low == high != -1 else None


class StagedForward:
    """Runs every calibration batch through a block once, compressing its stages on the way.

    Args:
        block: the block.
        stages: its stages (``find_stages``).
        snapshot: the block's state before calibration: its hooks are the calibration hooks
            that are replayed and suspended.
        compress: compresses the layers inside the subgraph it is given (emits
            SEQUENTIAL_EPOCH_END); called once per stage, when every batch has reached it.
    """

    def __init__(
        self,
        block: nn.Module,
        stages: list[Stage],
        snapshot: BlockSnapshot,
        compress: Callable[[nn.Module], None],
    ) -> None:
        self.block = block
        self.stages = stages
        self.snapshot = snapshot
        self.compress = compress
        self._compressed = [False] * len(stages)

    def run(self, batches: int, forward: Callable[[int], None]) -> None:
        """Runs ``forward(index)`` for every batch, each in its own greenlet, one at a time.

        Args:
            batches: how many batches.
            forward: runs the block on batch ``index`` and keeps its output.

        Raises:
            BaseException: whatever a batch's forward or a compression raised; every batch
                is unwound and every hook put back first.
        """
        workers = [_Batch(index, forward) for index in range(batches)]
        handles = self._install_hooks()
        with ExitStack() as suspended:
            try:
                runnable = workers
                while True:
                    for worker in runnable:
                        worker.step()
                    waiting = [worker for worker in workers if not worker.dead]
                    if not waiting:
                        break
                    index = min(worker.stage for worker in waiting)
                    stage = self.stages[index]
                    self.compress(nn.ModuleList(stage.layers))
                    self._compressed[index] = True
                    suspended.enter_context(self.snapshot.hooks_suspended(self.block, stage.layers))
                    runnable = [worker for worker in waiting if worker.stage == index]
            finally:
                for worker in workers:
                    worker.cancel()
                for handle in handles:
                    handle.remove()

    def _install_hooks(self) -> list[RemovableHandle]:
        handles = []
        for index, stage in enumerate(self.stages):
            replayed = [(layer, self._calibration_pre_hooks(layer)) for layer in stage.layers[1:]]
            pause = self._pause_hook(index, replayed)
            handles.append(stage.layers[0].register_forward_pre_hook(pause, with_kwargs=True))
            for layer in stage.layers[1:]:
                check = self._check_hook(index, layer)
                handles.append(layer.register_forward_pre_hook(check, prepend=True))
        return handles

    def _calibration_pre_hooks(self, layer: nn.Module) -> list[tuple[int, Callable[..., Any]]]:
        name = next(name for name, module in self.block.named_modules() if module is layer)
        return [
            (key, hook)
            for key, hook in layer._forward_pre_hooks.items()
            if (name, "_forward_pre_hooks", key) in self.snapshot.hooks
        ]

    def _pause_hook(
        self, index: int, replayed: list[tuple[nn.Module, list[tuple[int, Callable[..., Any]]]]]
    ) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
        """The hook on a stage's first layer: replay the others' hooks, wait, then run the
        hooks that compression added to the layer (its input quantizer)."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            worker = getcurrent()
            if not isinstance(worker, _Batch) or self._compressed[index]:
                return None
            for layer, hooks in replayed:
                for key, replay in hooks:
                    with_kwargs = key in layer._forward_pre_hooks_with_kwargs
                    result = replay(layer, args, kwargs) if with_kwargs else replay(layer, args)
                    if result is not None:
                        raise RuntimeError(
                            f"a calibration hook of {type(layer).__name__} changes the layer's "
                            "input, so the staged calibration cannot replay it; pass "
                            "staged=False"
                        )
            worker.inputs[index] = args[0] if args else None
            before = set(module._forward_pre_hooks)
            worker.pause(index)
            added = [
                (key, hook) for key, hook in module._forward_pre_hooks.items() if key not in before
            ]
            for key, added_hook in added:
                if key in module._forward_pre_hooks_with_kwargs:
                    result = added_hook(module, args, kwargs)
                    if result is not None:
                        args, kwargs = result
                else:
                    result = added_hook(module, args)
                    if result is not None:
                        args = result if isinstance(result, tuple) else (result,)
            return (args, kwargs) if added else None

        return hook

    def _check_hook(self, index: int, layer: nn.Module) -> Callable[[nn.Module, tuple], None]:
        """The hook on a stage's other layers: they must read what the first one read."""
        stage = self.stages[index]
        name = stage.names[stage.layers.index(layer)]

        def hook(module: nn.Module, args: tuple) -> None:
            worker = getcurrent()
            if not isinstance(worker, _Batch) or index not in worker.inputs:
                return
            read = (
                worker.inputs[index] if layer is not stage.layers[-1] else worker.inputs.pop(index)
            )
            if not args or not same_input(read, args[0]):
                raise RuntimeError(
                    f"'{name}' read another input than '{stage.names[0]}' in calibration batch "
                    f"{worker.index}, though it read the same one in the first batch; the "
                    "staged calibration needs the block to run the same way on every batch: "
                    "pass staged=False"
                )

        return hook


class _Cancelled(BaseException):
    """Unwinds a paused batch whose run was stopped."""


class _Batch(greenlet):
    """One calibration batch's forward: a greenlet the pipeline steps from stage to stage.

    Greenlets switch inside one thread, so every batch shares the thread's intra-op pool,
    allocator arena and grad mode (a thread per batch costs several milliseconds to start
    and keeps its own arena), and exceptions reach the pipeline at :meth:`step`.
    """

    def __init__(self, index: int, forward: Callable[[int], None]) -> None:
        super().__init__()
        self.index = index
        self.forward = forward
        self.stage: int | None = None
        self.inputs: dict[int, Any] = {}

    def run(self) -> None:
        """The greenlet's body: the batch's forward."""
        try:
            self.forward(self.index)
        except _Cancelled:
            pass
        finally:
            self.stage = None
            self.inputs.clear()

    def step(self) -> None:
        """Lets the batch run until it pauses at a stage or ends (from the pipeline).

        Raises:
            BaseException: what the batch's forward raised.
        """
        self.switch()

    def pause(self, stage: int) -> None:
        """Waits at ``stage`` until the pipeline steps this batch again (from the batch).

        Raises:
            _Cancelled: when the run was stopped meanwhile.
        """
        self.stage = stage
        self.parent.switch()
        self.stage = None

    def cancel(self) -> None:
        """Unwinds the batch if it is paused."""
        if self and not self.dead:
            self.throw(_Cancelled)
