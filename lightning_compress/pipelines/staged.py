"""Calibrating a block in one forward: its layers compressed group by group on the way.

When every modifier compresses each layer from that layer's own inputs (GPTQ, SparseGPT,
Wanda, round-to-nearest; see ``Modifier.staged_layers``), the sequential pipeline does not
need a calibration forward and then a second forward of the compressed block. Each
calibration batch runs through the block in its own greenlet, and pauses right before each
*stage*: the layers that read one input tensor (``q/k/v_proj``, ``gate/up_proj``), or layers
whose inputs the block declared before calling the first of them (a mixture's experts, see
:mod:`~lightning_compress.layers.known_inputs`: all experts' gate/up projections, then all
their down projections, split where their statistics would pass
:data:`DECLARED_STAGE_BYTES`). Once every batch has reached a stage, SEQUENTIAL_EPOCH_END with
a subgraph holding just that stage's layers compresses them, and the batches go on through the
compressed layers. The block's outputs are then the compressed block's, from one forward per
batch, and each layer is calibrated on inputs that the block's earlier, already compressed
layers produced.

Only one batch runs at a time; the others wait, so the statistics are gathered in batch
order as in a plain forward. A probe forward of the first batch, with the calibration hooks
suspended, finds the stages (of the first block, then of any block built unlike the last one
probed: blocks built alike reuse them). At a stage, the calibration hooks of the first layer a
batch calls run as in any forward; the other layers' are replayed before the batch pauses, on
the same input or on the one the block declared for them (the probe showed that they read it;
a declared layer the batch will not call, an expert without tokens, is left out), and once the
stage is compressed its layers' remaining calibration hooks are suspended until the block
ends, so every hook sees each batch once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from greenlet import getcurrent, greenlet
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.distributed import all_gather_or_raise, is_distributed
from lightning_compress.core.gram_bands import accumulator_bytes
from lightning_compress.core.tensors import same_input
from lightning_compress.layers.known_inputs import known_inputs
from lightning_compress.pipelines.capture import BlockInputs
from lightning_compress.pipelines.snapshot import BlockSnapshot

__all__ = ["Stage", "StageFinder", "StagedForward", "find_stages", "first_rank_stages"]


@dataclass(frozen=True)
class Stage:
    """Layers of a block compressed together, in the order the block calls them: they read
    one input tensor, or inputs the block declared before calling the first of them.

    Args:
        layers: the layers; a batch pauses before the first of them it calls.
        names: their names inside the block.
        declared: whether the inputs are declared ones (else the layers read one input).
    """

    layers: tuple[nn.Module, ...]
    names: tuple[str, ...]
    declared: bool = False


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
    calls: list[tuple[nn.Module, Any, Any]] = []  # (layer, its input, its declaration)

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        declared = known_inputs()
        calls.append((module, x, declared if declared and id(module) in declared else None))

    with snapshot.hooks_suspended(block), torch.no_grad():
        handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        try:
            block(*inputs.args, **inputs.kwargs)
        finally:
            for handle in handles:
                handle.remove()
    called = [id(module) for module, _, _ in calls]
    if len(set(called)) != len(called) or not all(isinstance(x, torch.Tensor) for _, x, _ in calls):
        return None
    groups: list[_Group] = []
    for module, x, declared in calls:
        if not groups or not groups[-1].takes(x, declared):
            groups.append(_Group([], x, declared, _statistics_bytes(x)))
        groups[-1].add(module, x)
    return [
        Stage(
            tuple(group.layers),
            tuple(names[id(m)] for m in group.layers),
            group.declared is not None,
        )
        for group in groups
    ]


DECLARED_STAGE_BYTES = 1 << 30
"""At most this many bytes of statistics in one stage of declared inputs (counted as a float64
input Hessian's accumulator per distinct input, the largest statistic a built-in modifier
keeps), at least one input's: the layers of a larger declaration, e.g. many large experts each
with its own tokens, are split into consecutive stages, so that they do not all hold their
statistics at once."""


def _statistics_bytes(x: torch.Tensor) -> int:
    """The bytes of a float64 Hessian's accumulator of inputs like ``x``."""
    rows = torch.promote_types(x.dtype, torch.float32)
    return accumulator_bytes(x.shape[-1], torch.float64, rows)


@dataclass
class _Group:
    """The layers of a stage being found, the latest input they read, their declaration (None:
    one input, undeclared) and the bytes of statistics their inputs need."""

    layers: list[nn.Module]
    x: torch.Tensor
    declared: Any
    size: int

    def takes(self, x: torch.Tensor, declared: Any) -> bool:
        """Whether a layer called on ``x`` under ``declared`` joins this stage: both under one
        declaration (while its statistics fit :data:`DECLARED_STAGE_BYTES`), or both
        undeclared and reading one input."""
        if declared is None or self.declared is None:
            return declared is None and self.declared is None and same_input(self.x, x)
        if declared is not self.declared:
            return False
        return same_input(self.x, x) or self.size + _statistics_bytes(x) <= DECLARED_STAGE_BYTES

    def add(self, layer: nn.Module, x: torch.Tensor) -> None:
        """Appends ``layer``, called on ``x``."""
        if self.layers and not same_input(self.x, x):
            self.size += _statistics_bytes(x)
        self.layers.append(layer)
        self.x = x


class StageFinder:
    """Finds each block's stages, probing only a block built unlike the last one probed.

    Decoder layers are built alike (the same modules of the same types under the same names)
    and run their layers the same way, so the stages probed on one block are mapped by name
    onto the next ones instead of probing each (a probe is a forward of one batch). The staged
    forward still checks, on every batch, that a stage's layers read one input.
    """

    def __init__(self) -> None:
        self._probed: tuple[Any, ...] | None = None
        self._names: list[tuple[tuple[str, ...], bool]] | None = None

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
            self._names = None if stages is None else [(s.names, s.declared) for s in stages]
            return stages
        if self._names is None:
            return None
        return [
            Stage(tuple(modules[name] for name in group), group, declared)
            for group, declared in self._names
        ]


def first_rank_stages(block: nn.Module, stages: list[Stage] | None) -> list[Stage] | None:
    """Rank 0's stages of ``block`` on every rank (a collective call).

    Each rank probes its own first batch, and a mixture routes different batches to different
    experts, so the ranks' probes may find different stages. Rank 0's first batch is the
    first of the whole data (the shard sampler gives rank ``r`` samples ``r, r + N, ...``), so
    with its stages every rank calibrates the block as one process would; a rank whose
    batches skip a stage's layers, or reach layers in no stage, handles them as one process
    does its later batches.

    Args:
        block: the block.
        stages: this rank's stages (only rank 0's are used), or None when it cannot run the
            block in stages.

    Returns:
        Rank 0's stages with this rank's modules, or None.
    """
    if not is_distributed():
        return stages
    described = None if stages is None else [(s.names, s.declared) for s in stages]
    first = all_gather_or_raise(described, None)[0]
    if first is None:
        return None
    modules = dict(block.named_modules())
    return [Stage(tuple(modules[name] for name in names), names, flag) for names, flag in first]


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
            hooks = [(layer, self._calibration_pre_hooks(layer)) for layer in stage.layers]
            for layer in stage.layers:
                hook = self._stage_hook(index, layer, hooks)
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
        return handles

    def _calibration_pre_hooks(self, layer: nn.Module) -> list[tuple[int, Callable[..., Any]]]:
        name = next(name for name, module in self.block.named_modules() if module is layer)
        return [
            (key, hook)
            for key, hook in layer._forward_pre_hooks.items()
            if (name, "_forward_pre_hooks", key) in self.snapshot.hooks
        ]

    def _stage_hook(
        self,
        index: int,
        layer: nn.Module,
        hooks: list[tuple[nn.Module, list[tuple[int, Callable[..., Any]]]]],
    ) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
        """The hook on each layer of a stage, after its calibration hooks. On the first of
        them a batch calls: replay the others' calibration hooks, wait for the stage to be
        compressed, then run the hooks that compression added to the layer (its input
        quantizer). On the others, once compressed: check they read what was replayed."""
        stage = self.stages[index]
        others = [(other, replays) for other, replays in hooks if other is not layer]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            worker = getcurrent()
            if not isinstance(worker, _Batch):
                return None
            if self._compressed[index]:
                self._check_input(worker, index, module, args)
                return None
            if stage.declared and id(module) not in (known_inputs() or {}):
                raise RuntimeError(
                    f"'{stage.names[stage.layers.index(module)]}' ran without the input its "
                    f"block declared for it in the first batch, in calibration batch "
                    f"{worker.index}; the staged calibration needs the block to run the same way "
                    "on every batch: pass staged=False"
                )
            for other, replays in others:
                read = self._replay(stage, other, replays, args, kwargs)
                if read is not None:
                    worker.inputs[(index, id(other))] = read
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

    @staticmethod
    def _replay(
        stage: Stage,
        layer: nn.Module,
        replays: list[tuple[int, Callable[..., Any]]],
        args: tuple,
        kwargs: dict,
    ) -> Any:
        """Runs ``layer``'s calibration hooks on the input it will read: the block's
        declaration for it, or the input of the layer being called (a stage of one input).

        Returns:
            That input, or None when the block declared none for ``layer`` (it will not call it).
        """
        if stage.declared:
            declared = known_inputs()
            if declared is None or id(layer) not in declared:
                return None
            args, kwargs = (declared[id(layer)],), {}
        for key, replay in replays:
            with_kwargs = key in layer._forward_pre_hooks_with_kwargs
            result = replay(layer, args, kwargs) if with_kwargs else replay(layer, args)
            if result is not None:
                raise RuntimeError(
                    f"a calibration hook of {type(layer).__name__} changes the layer's "
                    "input, so the staged calibration cannot replay it; pass staged=False"
                )
        return args[0] if args else None

    def _check_input(self, worker: _Batch, index: int, layer: nn.Module, args: tuple) -> None:
        """Refuses a layer that reads another input than its calibration hooks were replayed on."""
        read = worker.inputs.pop((index, id(layer)), None)
        if read is None or (args and same_input(read, args[0])):
            return
        stage = self.stages[index]
        name = stage.names[stage.layers.index(layer)]
        what = "the one the block declared for it" if stage.declared else f"'{stage.names[0]}'"
        raise RuntimeError(
            f"'{name}' read another input than {what} in calibration batch {worker.index}, "
            "though it read the same one in the first batch; the staged calibration needs the "
            "block to run the same way on every batch: pass staged=False"
        )


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
        self.inputs: dict[tuple[int, int], Any] = {}  # (stage, id(layer)): input replayed

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
