"""``LayerwiseModifier``: calibrate each layer on its own inputs, then compress it.

GPTQ, SparseGPT, Wanda and round-to-nearest quantization all follow one flow, kept here:
plan the targeted layers, hook them at calibration start so a collector gathers the
statistics of their inputs, compress the pending layers of each block at its
SEQUENTIAL_EPOCH_END (a stack of layers reading one input at a time), and the rest at the
end. A subclass says what statistic to collect (:meth:`make_collector`), how to compress a
stack of layers given it (:meth:`compress_stack`) and without it (:meth:`compress_data_free`),
and what a compressed layer keeps (:meth:`apply_result`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch
from loguru import logger
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_compress.core.distributed import is_distributed, rank_and_world_size
from lightning_compress.core.events import Event
from lightning_compress.core.state import State
from lightning_compress.modifiers.base import Modifier
from lightning_compress.modifiers.hessian import HessianAccumulator, SingularHessianError
from lightning_compress.modifiers.hessian_collector import HessianCollector, mask_sources
from lightning_compress.modifiers.layerwise import (
    StatisticsCollector,
    check_calibrated,
    check_finite_weights,
    layers_inside,
    linear_layers,
    modules_inside,
    needs_data,
    solve_on_hessian,
)
from lightning_compress.modifiers.layerwise_split import (
    CompressedLayer,
    StackOutcome,
    assign_owners,
    join_row_slices,
    share_outcomes,
)
from lightning_compress.modifiers.tied_weights import untie_weights
from lightning_compress.modifiers.tiled_cholesky import factoring_together

__all__ = ["CompressedLayer", "HessianMethod", "LayerwiseModifier", "PendingLayer"]


Result = TypeVar("Result")
"""What a Hessian method's solve returns."""


class PendingLayer(NamedTuple):
    """A planned layer and its per-layer settings.

    Args:
        module: the layer (an ``nn.Linear``).
        settings: what the method needs per layer (the quantization scheme), else None.
    """

    module: nn.Linear
    settings: Any = None


class LayerwiseModifier(Modifier, register=False):
    """Base of one-shot modifiers that compress each ``nn.Linear`` from its own inputs.

    ``initialize`` plans the layers (:meth:`plan_layers`), refuses a weight holding NaN or
    Inf, naming the layer, and gives a layer whose weight another module shares its own copy.
    At the start of calibration every planned layer gets a forward pre-hook feeding its input
    to the collector (and the layers' ancestors that take an ``attention_mask`` a hook that
    keeps padded tokens out of it), plus :meth:`layer_hooks`; the statistics follow a
    smoothing modifier that rescales the inputs after they were observed. At each
    SEQUENTIAL_EPOCH_END the pending layers inside the subgraph are compressed: their
    statistics are summed over ranks, every layer's result is computed (stacks of layers
    sharing their statistics together), and only then are the layers changed, their hooks
    removed and their statistics freed; an error leaves them as they were. The end of
    calibration compresses the rest. A modifier that :attr:`needs_calibration_data` and
    got none raises a ``RecipeError`` and leaves the model unchanged.

    Too few tokens: a layer whose statistics hold fewer than :attr:`min_tokens` tokens while
    layers of the same block (or, at the end, of the same call) had them, e.g. an expert the
    router sent nothing, is named in a warning and compressed by :meth:`compress_data_free`.
    When no layer of the block had tokens, no data reached it: an error names the layers.
    A stack whose computation fails in a way :meth:`recoverable` accepts (a Hessian still
    singular after the dampening retries) falls back the same way, named in the log.

    Several processes: every rank compresses with the statistics summed over all ranks. A
    method whose per-layer computation is worth splitting (:attr:`parallel_solve`) computes
    each layer on one owner rank only, chosen to balance the work (a layer too costly for one
    rank, in row slices on several, where :meth:`row_divisible` allows;
    :mod:`~lightning_compress.modifiers.layerwise_split`), and broadcasts the result, so N
    processes share the work and end with the same layers, bit for bit; an error on an
    owner is raised on every rank. Other methods compute every layer on every rank.

    Per-layer results go to ``layer_losses`` (where the method has a loss),
    ``layer_fallbacks`` and the loggers (``<log_tag>/loss``, ``<log_tag>/seconds`` and what
    :meth:`apply_result` reports).
    """

    log_tag: ClassVar[str | None] = None
    """Prefix of the logged losses and times (None: not logged)."""
    data_free_method: ClassVar[str]
    """What :meth:`compress_data_free` does, for the warnings."""
    min_tokens: ClassVar[int] = 1
    """Fewest calibration tokens a layer's statistics need."""
    parallel_solve: ClassVar[bool] = False
    """Under several processes, compute each layer on one owner rank and broadcast it (for
    methods whose computation costs more than sending the result)."""

    # ----------------------------------------------------- for the subclasses
    def plan_layers(self, model: nn.Module) -> dict[str, PendingLayer]:
        """The layers to compress, each with its settings; nothing is changed yet.

        Args:
            model: the model.

        Returns:
            The layers, by name, in model order. By default the targets, each without
            settings.

        Raises:
            RecipeError: when a target is not an ``nn.Linear``, or does not fit the settings.
        """
        layers = linear_layers(type(self).__name__, self.resolve_targets(model))
        return {name: PendingLayer(module) for name, module in layers.items()}

    def compression_targets(self, model: nn.Module) -> dict[str, nn.Module]:
        """The layers :meth:`plan_layers` plans (see ``Modifier``)."""
        return self._modules(self.plan_layers(model))

    def make_collector(self) -> StatisticsCollector | None:
        """The collector of the input statistics the method needs (None: it needs none).

        Returns:
            A fresh collector, or None.
        """
        return None

    def layer_hooks(self, name: str, layer: PendingLayer) -> list[tuple[Callable, str]]:
        """Further calibration hooks of one layer, removed once it is compressed.

        Args:
            name: the layer's name.
            layer: the layer and its settings.

        Returns:
            ``(hook, kind)`` pairs (see :meth:`Modifier.register_hook`); none by default.
        """
        return []

    def stacks(self, names: list[str], statistics: Mapping[str, Any]) -> list[list[str]]:
        """Groups the layers that one :meth:`compress_stack` call handles together.

        Layers of a group must share their statistics. By default each layer is alone.

        Args:
            names: the layers to compress.
            statistics: their reduced input statistics, by name.

        Returns:
            The groups of names, covering ``names``.
        """
        return [[name] for name in names]

    def compress_stack(self, stack: list[str], statistics: Any) -> dict[str, CompressedLayer]:
        """Computes the compressed layers of ``stack``, without changing them.

        Args:
            stack: the layers' names.
            statistics: their (shared) reduced input statistics, None without a collector.

        Returns:
            Each layer's result, by name.
        """
        raise NotImplementedError

    def divisible(self, stack: list[str]) -> bool:
        """Whether the layers of ``stack`` may be computed in separate :meth:`compress_stack`
        calls (on different ranks) with the results they get together.

        Args:
            stack: a stack from :meth:`stacks`.

        Returns:
            False by default: a stack is computed whole.
        """
        return False

    def row_divisible(self, name: str) -> bool:
        """Whether layer ``name`` may be computed in row slices (:meth:`compress_rows`, on
        different ranks) joined by :meth:`join_rows` into what one call would give.

        Args:
            name: a pending layer, alone in its part of a stack.

        Returns:
            False by default: a layer is computed whole.
        """
        return False

    def compress_rows(self, name: str, statistics: Any, rows: tuple[int, int]) -> CompressedLayer:
        """Computes the rows ``[start, stop)`` of layer ``name`` compressed (only for layers
        :meth:`row_divisible` allows).

        Args:
            name: the layer.
            statistics: its reduced input statistics.
            rows: ``(start, stop)``.

        Returns:
            The slice's result.
        """
        raise NotImplementedError

    def join_rows(self, name: str, slices: list[CompressedLayer]) -> CompressedLayer:
        """Joins the results of :meth:`compress_rows` for layer ``name``, in row order.

        Args:
            name: the layer.
            slices: its slices' results, covering its rows in order.

        Returns:
            The layer's result.
        """
        raise NotImplementedError

    def compress_data_free(self, name: str) -> CompressedLayer:
        """Computes layer ``name`` compressed from its weight alone, without changing it.

        Args:
            name: a pending layer.

        Returns:
            The result.
        """
        raise NotImplementedError

    def recoverable(self, error: Exception) -> bool:
        """Whether a stack whose :meth:`compress_stack` raised ``error`` falls back to
        :meth:`compress_data_free` (with a warning) instead of failing.

        Args:
            error: what :meth:`compress_stack` raised.

        Returns:
            False by default.
        """
        return False

    def apply_result(self, name: str, layer: PendingLayer, result: CompressedLayer) -> None:
        """Puts a computed result into the layer. By default copies the weight.

        Args:
            name: the layer's name.
            layer: the layer and its settings.
            result: what was computed for it.
        """
        with torch.no_grad():
            layer.module.weight.copy_(result.weight)

    def log_results(self, state: State, results: dict[str, CompressedLayer]) -> None:
        """Records what the layers just compressed give beyond losses and times.

        Args:
            state: the session's state.
            results: the layers' results, by name (already applied).
        """

    # ---------------------------------------------------------------- lifecycle
    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self._plan = self.plan_layers(state.model)
        owner = type(self).__name__
        modules = {name: layer.module for name, layer in self._plan.items()}
        check_finite_weights(owner, modules)
        optimizer = None if self.is_one_shot else state.optimizer
        untie_weights(owner, state.model, modules, optimizer)
        self._pending: dict[str, PendingLayer] = dict(self._plan)
        self._collector = self.make_collector()
        self._layer_hooks: dict[str, list[RemovableHandle]] = {}
        self._tokens: dict[str, int] = {}  # tokens each compressed layer saw, on all ranks
        self._scope: list[str] = []  # the planned layers of the block being compressed
        self.layer_losses: dict[str, float] = {}
        self.layer_fallbacks: dict[str, str] = {}

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        if event is None and self._collector is not None:
            raise needs_data(type(self).__name__, "finalize ran without calibration")
        for name, layer in self._plan.items():
            for hook, kind in self.layer_hooks(name, layer):
                self._register_layer_hook(name, hook, kind)
        if self._collector is None:
            return
        for name in self._plan:
            self._register_layer_hook(name, self._collector.layer_hook(name), "forward_pre")
        for module in mask_sources(state.model, self._plan):
            hook = self._collector.mask_hook(module)
            self.register_hook(module, hook, "forward_pre", with_kwargs=True)
        self._collector.follow_input_scaling(self._modules(self._plan))

    def on_sequential_epoch_end(self, state: State, subgraph: nn.Module | None) -> None:
        if not self.active:
            return
        owner = type(self).__name__
        names = layers_inside(owner, subgraph, self._modules(self._pending))
        self._compress(state, names, layers_inside(owner, subgraph, self._modules(self._plan)))

    def staged_layers(self, subgraph: nn.Module) -> list[nn.Module] | None:
        """The pending layers inside ``subgraph``: each is compressed from its own inputs.

        Args:
            subgraph: the block about to be calibrated.

        Returns:
            The layers (none while the modifier is not active).
        """
        if not self.active:
            return []
        return modules_inside(subgraph, [layer.module for layer in self._pending.values()])

    def skip_block(self, state: State, block: nn.Module) -> None:
        """Forgets the pending layers inside ``block`` (compressed by an earlier run) and
        removes their calibration hooks.

        Args:
            state: the session's state.
            block: the finished block.
        """
        if not self.active:
            return
        names = layers_inside(type(self).__name__, block, self._modules(self._pending))
        for name in names:
            del self._pending[name]
            for handle in self._layer_hooks.pop(name, []):
                handle.remove()
        if self._collector is not None:
            self._collector.discard(names)

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        try:
            names = list(self._pending)
            self._compress(state, names, names)
        finally:
            self._clear_collector()
        self.remove_hooks()

    def abort(self, state: State) -> None:
        """Stop without finishing: free the statistics and remove every hook.

        Layers already compressed stay compressed.

        Args:
            state: the session's state.
        """
        self._clear_collector()
        super().abort(state)

    # ---------------------------------------------------------------- compressing
    @staticmethod
    def _modules(layers: Mapping[str, PendingLayer]) -> dict[str, nn.Module]:
        return {name: layer.module for name, layer in layers.items()}

    def _register_layer_hook(self, name: str, hook: Callable[..., Any], kind: str) -> None:
        handle = self.register_hook(self._plan[name].module, hook, kind)
        self._layer_hooks.setdefault(name, []).append(handle)

    def _clear_collector(self) -> None:
        if getattr(self, "_collector", None) is not None:
            self._collector.clear()

    def _compress(self, state: State, names: list[str], scope: list[str]) -> None:
        """Compresses the pending layers ``names``: every one is computed before any changes.

        Every rank calls it with the same layers in the same order.

        Args:
            state: the session's state.
            names: the pending layers to compress.
            scope: the planned layers of the same block (or call): if none of them had
                tokens, no calibration data reached ``names``.
        """
        self._scope = scope
        results = self.compute_layers(state, names)
        for name, result in results.items():
            layer = self._pending.pop(name)
            for handle in self._layer_hooks.pop(name, []):
                handle.remove()
            self.apply_result(name, layer, result)
        if self._collector is not None:
            self._collector.discard(names)
        self.log_results(state, results)

    def compute_layers(self, state: State, names: list[str]) -> dict[str, CompressedLayer]:
        """Computes the pending layers ``names`` compressed, without changing them.

        Args:
            state: the session's state.
            names: the layers, in plan order (the same on every rank).

        Returns:
            Each layer's result, by name.

        Raises:
            RecipeError: when no calibration data reached the layers at all.
            ValueError: when no layer of their block saw tokens, or a layer's statistics are
                not finite; the message names the layers.
        """
        if self._collector is None:
            statistics: dict[str, Any] = dict.fromkeys(names)
            starved: list[str] = []
        else:
            statistics = self._collector.reduced(
                self._modules({n: self._pending[n] for n in names})
            )
            starved = self._starved(statistics)
        results, losses, seconds = {}, {}, {}
        calibrated = [name for name in names if name not in starved]
        stacks = self.stacks(calibrated, statistics)
        if self.parallel_solve and stacks and is_distributed():  # the same stacks on all ranks
            outcomes = self._compute_on_owners(stacks, statistics)
        else:
            outcomes = [self._compute_stack(stack, statistics) for stack in stacks]
        for outcome in outcomes:
            for name, result in outcome.results.items():
                results[name], seconds[name] = result, outcome.seconds
                if result.loss is not None:
                    losses[name] = result.loss
                if outcome.fallback is not None:
                    self.layer_fallbacks[name] = outcome.fallback
        if starved:
            reason = f"fewer than {self.min_tokens} calibration token(s)"
            results.update(self._fall_back(starved, reason))
            self.layer_fallbacks.update(dict.fromkeys(starved, reason))
        self._log(state, losses, seconds)
        return {name: results[name] for name in names}

    def _compute_stack(
        self,
        stack: list[str],
        statistics: Mapping[str, Any],
        rows: tuple[int, int] | None = None,
    ) -> StackOutcome:
        """``stack`` computed by :meth:`compress_stack` (the ``rows`` of its one layer by
        :meth:`compress_rows`), or whole by the data-free method when it fails in a way
        :meth:`recoverable` accepts."""
        begin = time.perf_counter()
        fallback = None
        try:
            if rows is None:
                computed = self.compress_stack(stack, statistics[stack[0]])
            else:
                computed = {stack[0]: self.compress_rows(stack[0], statistics[stack[0]], rows)}
        except Exception as err:
            if not self.recoverable(err):
                raise
            fallback = str(err)
            computed = self._fall_back(stack, fallback)
        return StackOutcome(computed, (time.perf_counter() - begin) / len(stack), fallback)

    def _compute_on_owners(
        self, stacks: list[list[str]], statistics: Mapping[str, Any]
    ) -> list[StackOutcome]:
        """Computes each part of ``stacks`` on its owner rank only and shares the outcomes
        (see :mod:`~lightning_compress.modifiers.layerwise_split`)."""
        rank, world_size = rank_and_world_size()
        weights = {name: self._pending[name].module.weight for stack in stacks for name in stack}
        shapes = {name: weight.shape for name, weight in weights.items()}
        plan = assign_owners(stacks, shapes, self.divisible, world_size, self.row_divisible)
        local: dict[int, StackOutcome] = {}
        error = None
        mine = [index for index, part in enumerate(plan) if part.owner == rank]
        sliced = [index for index in mine if plan[index].rows is not None]
        try:
            # every rank holds one slice of each sliced layer: they come first, each
            # layer's Hessian factored by the ranks together, then this rank's whole parts
            with factoring_together() as together:
                for index in sliced:
                    part = plan[index]
                    try:
                        local[index] = self._compute_stack(part.names, statistics, part.rows)
                    except Exception:  # the others stop at their next agreement
                        together.give_up()
                        raise
                    together.agree()
            for index in mine:
                if index not in local:
                    local[index] = self._compute_stack(plan[index].names, statistics)
        except Exception as err:  # raised on every rank by share_outcomes
            error = err
        devices = {name: weight.device for name, weight in weights.items()}
        return join_row_slices(plan, share_outcomes(plan, local, error, devices), self.join_rows)

    def _starved(self, statistics: Mapping[str, Any]) -> list[str]:
        """The layers with too few tokens whose block had tokens (they fall back), after
        refusing layers that no calibration data reached at all."""
        for name, stats in statistics.items():
            self._tokens[name] = stats.num_samples
        few = [name for name, stats in statistics.items() if stats.num_samples < self.min_tokens]
        if not few:
            return []
        fed = any(self._tokens.get(name, 0) >= self.min_tokens for name in self._scope)
        if not fed:
            check_calibrated(type(self).__name__, statistics, self._collector.num_reads)
        return few

    def _fall_back(self, names: list[str], reason: str) -> dict[str, CompressedLayer]:
        """``names`` compressed by the data-free method, with a warning naming them."""
        logger.warning(
            "{}: {} ({}): compressed with {} instead",
            type(self).__name__,
            names,
            reason,
            self.data_free_method,
        )
        return {name: self.compress_data_free(name) for name in names}

    def _log(self, state: State, losses: dict[str, float], seconds: dict[str, float]) -> None:
        self.layer_losses.update(losses)
        if state.loggers is None or not seconds or self.log_tag is None:
            return
        if losses:
            state.loggers.log_scalars(f"{self.log_tag}/loss", losses)
        state.loggers.log_scalars(f"{self.log_tag}/seconds", seconds)


class HessianMethod(LayerwiseModifier, register=False):
    """Settings and statistics of the methods that solve on the input Hessian (GPTQ,
    SparseGPT).

    Layers reading the same input share one Hessian (see
    :class:`~lightning_compress.modifiers.hessian_collector.HessianCollector`), summed in
    float64 across ranks, so several processes compress exactly like one. When the damped
    Hessian cannot be inverted, the dampening is retried 10x larger up to three times
    (``dampening_frac`` x 1, 10, 100, 1000); if it still cannot, the layers fall back to the
    data-free method with a warning naming them. With ``dampening_frac: 0`` nothing is
    retried and a singular Hessian is an error naming the layers.

    Under several processes each layer's solve runs on one owner rank, the layers of a stack
    that :meth:`divisible` allows spread over the ranks (see :class:`LayerwiseModifier`).

    Args:
        block_size: columns per lazy batch update of the column sweep.
        dampening_frac: dampening added to the Hessian's diagonal, as a fraction of its mean.
        offload_hessians: keep the Hessians on the CPU while blocks run on an accelerator.
    """

    block_size: int = 128
    dampening_frac: float = 0.01
    offload_hessians: bool = False

    def validate(self) -> None:
        if self.block_size <= 0:
            self.fail("block_size", "an int > 0")
        if not 0 <= self.dampening_frac < 1:
            self.fail("dampening_frac", "a float in [0, 1)")
        super().validate()

    @property
    def needs_calibration_data(self) -> bool:
        """Always: the method needs the input Hessians."""
        return True

    parallel_solve: ClassVar[bool] = True

    def make_collector(self) -> HessianCollector:
        return HessianCollector(offload=self.offload_hessians)

    def solve(
        self,
        names: list[str],
        weight: Tensor,
        statistics: HessianAccumulator,
        method: Callable[[Tensor], Result],
    ) -> Result:
        """``method`` on the Hessian of the layers ``names`` (see
        :func:`~lightning_compress.modifiers.layerwise.solve_on_hessian`), made in the
        collectors' workspace: one buffer for every solve of the run.

        Args:
            names: the layers sharing the Hessian.
            weight: their (stacked) weight, or rows of it.
            statistics: their reduced input Hessian's accumulator.
            method: the method given the Hessian, which it may change.

        Returns:
            What ``method`` returns.
        """
        workspace = self._collector.workspace
        owner = type(self).__name__
        return solve_on_hessian(
            owner, names, weight, statistics, self.dampening_frac, method, workspace
        )

    def recoverable(self, error: Exception) -> bool:
        """A Hessian still singular after the dampening retries (``dampening_frac > 0``).

        Args:
            error: what the computation raised.

        Returns:
            Whether the layers fall back to the data-free method.
        """
        return isinstance(error, SingularHessianError) and self.dampening_frac > 0
