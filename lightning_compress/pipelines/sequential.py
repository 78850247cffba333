"""The sequential pipeline: calibrate and compress one block at a time, without torch.fx."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.core.distributed import check_same_on_all_ranks
from lightning_compress.core.progress import BlockProgress, progress_bar
from lightning_compress.pipelines.base import (
    BlockReport,
    CalibrationPipeline,
    PipelineOptions,
    WeightResidency,
    placed_on,
)
from lightning_compress.pipelines.blocks import find_blocks, hidden_states_of
from lightning_compress.pipelines.cache import ActivationCache
from lightning_compress.pipelines.capture import capture_block_inputs
from lightning_compress.pipelines.snapshot import BlockSnapshot, BlockVersions
from lightning_compress.pipelines.staged import (
    Stage,
    StagedForward,
    StageFinder,
    first_rank_stages,
)
from lightning_compress.pipelines.tail import ModelTail

__all__ = ["SequentialPipeline"]


class SequentialPipeline(CalibrationPipeline):
    """Calibrates the repeated blocks (decoder layers) one after another.

    Each batch runs the model only up to the first block, whose inputs (hidden states and
    every positional and keyword argument: masks, positions, rotary embeddings) go to the
    activation cache. Then, block by block: the block moves to ``options.device``, runs the
    cached batches, SEQUENTIAL_EPOCH_END lets the modifiers compress it, its outputs become
    the next block's inputs, and it moves back. After the last block, when a modifier
    observes a module that runs after the blocks (``lm_head``), the model's tail is calibrated
    the same way: the final norm and the LM head run on the compressed blocks' outputs
    (``pipelines.tail``), then one SEQUENTIAL_EPOCH_END compresses the modules outside the
    blocks; otherwise they never run.

    One forward per batch and block, except where exactness needs two: a block that no hook
    observes is compressed first and then run once, so its outputs are the compressed
    block's; an observed block runs once with the hooks, and runs a second time (calibration
    hooks suspended) only when compression changed its forward, unless
    ``propagate_compressed`` is False.

    Whatever fails while a block is calibrated (its forward, a modifier, an interrupt), the
    block is restored as it was (weights, and no buffer, hook or attribute added to it), so
    blocks are compressed entirely or not at all; the blocks finished before stay compressed
    (see ``CalibrationPipeline``). The same holds for the tail. Every rank walks the same
    blocks. With ``options.progress`` a bar shows the blocks and, after each block, a log line
    (loguru INFO) gives its time, the mean time per block and the estimated time left.

    Args:
        model: the session's model.
        session: the initialized session.
        options: the pipeline settings.

    Raises:
        ValueError: if the model has no repeated blocks.
    """

    name = "sequential"

    def __init__(
        self, model: nn.Module, session: CompressionSession, options: PipelineOptions
    ) -> None:
        super().__init__(model, session, options)
        self.blocks = find_blocks(model, options.sequential_targets)
        if not self.blocks:
            raise ValueError(
                f"{type(model).__name__} has no repeated blocks (no nn.ModuleList of two or "
                f"more modules of one class); pass sequential_targets or use pipeline='basic'"
            )
        self.cache = ActivationCache(options.offload_dir)
        self.stage_finder = StageFinder()
        self.tail = ModelTail(model, self.blocks)
        self._batches: list[Any] = []
        self._blocks_return_tuples = False

    @property
    def block_names(self) -> list[str]:
        """The names of the blocks, in calibration order."""
        return [name for name, _ in self.blocks]

    def start(self) -> None:
        check_same_on_all_ranks(len(self.blocks), "the number of blocks")
        check_same_on_all_ranks(
            self.options.residency is not None,
            "reading the weights one block at a time (1, out_of_core) or holding them (0); "
            "pass out_of_core=True or False so that every process chooses the same",
        )
        if self.options.residency is not None:
            self.options.residency.load_outside(self.tail.modules)
        super().start()
        self.tail.watch()

    def add_batch(self, batch: Any) -> None:
        with torch.no_grad(), self.tail.capturing():
            self.cache.append(capture_block_inputs(self.model, self.blocks[0][1], batch))
        if self.tail.watching:
            self._batches.append(batch)

    def run(self) -> None:
        enabled = self.options.progress
        blocks = progress_bar(self.blocks, "Calibrating blocks", enabled=enabled, unit="block")
        residency = self.options.residency
        first = 0
        if residency is not None:
            residency.release_outside(self.tail.modules)
            first = self._resume(residency)
        progress = BlockProgress(len(self.blocks), done=first, enabled=enabled)
        for index, (name, block) in enumerate(blocks):
            if index < first:
                continue
            begin = time.perf_counter()
            if residency is not None:
                residency.load_block(name, block)
            forwards = self._calibrate(block)
            self.compressed.append(name)
            if residency is not None:
                residency.finish_block(index, name, block, self.cache)
            seconds = time.perf_counter() - begin
            progress.block_done(name, seconds)
            if self.options.on_block_end is not None:
                self.options.on_block_end(BlockReport(index, name, seconds, forwards))
        if residency is not None:
            residency.load_outside(self.tail.modules)
        self._calibrate_tail()

    def _resume(self, residency: WeightResidency) -> int:
        """Skips the blocks an earlier run finished: their saved outputs replace the cache and
        the modifiers forget them. Returns the first block to calibrate."""
        saved = ActivationCache(self.options.offload_dir)
        first = residency.resume(saved)
        if first == 0:
            saved.close()
            return 0
        self.cache.close()
        self.cache = saved
        for name, block in self.blocks[:first]:
            for modifier in self.session.lifecycle.recipe.modifiers:
                modifier.skip_block(self.session.state, block)
            self.compressed.append(name)
        return first

    def close(self) -> None:
        self.cache.close()
        self._batches = []
        super().close()

    def _calibrate_tail(self) -> None:
        """Runs the modules after the blocks on every batch and compresses the modules
        outside the blocks, when a modifier observes one after them; on any failure aborts
        the modifiers and restores them."""
        if not self.tail.needs_calibration(bool(self._batches)):
            return
        subgraph = self.tail.subgraph
        snapshot = BlockSnapshot(subgraph)
        try:
            with placed_on(subgraph, self.options.device) as device, torch.no_grad():
                for index, batch in enumerate(self._batches):
                    hidden_states = self.cache.inputs(index).hidden_states.to(device)
                    self.tail.forward(batch, hidden_states, self._blocks_return_tuples)
                self._emit_block_end(subgraph)
        except BaseException:
            self.session.lifecycle.abort()
            snapshot.restore(subgraph)
            raise

    def _calibrate(self, block: nn.Module) -> int:
        """Calibrates and compresses ``block``; on any failure aborts the modifiers and
        restores the block."""
        snapshot = BlockSnapshot(block)
        try:
            return self._calibrate_block(block, snapshot)
        except BaseException:
            self.session.lifecycle.abort()
            snapshot.restore(block)
            raise

    def _calibrate_block(self, block: nn.Module, snapshot: BlockSnapshot) -> int:
        observed = snapshot.observed
        with placed_on(block, self.options.device) as device, torch.no_grad():
            stages = self._stages(block, snapshot, device) if observed else None
            if stages:
                return self._calibrate_in_stages(block, snapshot, stages, device)
            if observed:
                self._forward(block, device)
            self._emit_block_end(block)
            reuse = not self.options.propagate_compressed or not snapshot.changed(block)
            if observed and reuse:
                self.cache.commit_outputs()
                return 1
            self._forward_again(block, snapshot, device)
            return 2 if observed else 1

    def _stages(
        self, block: nn.Module, snapshot: BlockSnapshot, device: torch.device
    ) -> list[Stage] | None:
        """The block's stages when it can be calibrated in one staged forward, else None."""
        if not (self.options.staged and self.options.propagate_compressed):
            return None
        layers: dict[int, nn.Module] = {}
        for modifier in self.session.lifecycle.recipe.modifiers:
            staged = modifier.staged_layers(block)
            if staged is None:
                layers = {}
                break
            layers.update((id(layer), layer) for layer in staged)
        stages = None  # every rank probes (a sharded block's forward is collective)
        if layers and len(self.cache):
            stages = self.stage_finder.find(
                block, list(layers.values()), lambda: self.cache.inputs(0).to(device), snapshot
            )
        return first_rank_stages(block, stages)

    def _calibrate_in_stages(
        self, block: nn.Module, snapshot: BlockSnapshot, stages: list[Stage], device: torch.device
    ) -> int:
        """One forward compressing the stages on the way, then SEQUENTIAL_EPOCH_END for the
        block (layers no batch reached, modifiers acting per block); a second forward only if
        that changed the block."""
        run = StagedForward(block, stages, snapshot, self._emit_block_end)
        run.run(len(self.cache), lambda index: self._forward_batch(block, device, index))
        versions = BlockVersions(block)
        self._emit_block_end(block)
        if not versions.changed(block):
            self.cache.commit_outputs()
            return 1
        self._forward_again(block, snapshot, device)
        return 2

    def _emit_block_end(self, subgraph: nn.Module) -> None:
        self.session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=subgraph)

    def _forward_again(
        self, block: nn.Module, snapshot: BlockSnapshot, device: torch.device
    ) -> None:
        """Replaces the staged outputs by those of the compressed block (calibration hooks
        suspended)."""
        self.cache.discard_outputs()
        with snapshot.hooks_suspended(block):
            self._forward(block, device)
        self.cache.commit_outputs()

    def _forward(self, block: nn.Module, device: torch.device) -> None:
        for index in range(len(self.cache)):
            self._forward_batch(block, device, index)

    def _forward_batch(self, block: nn.Module, device: torch.device, index: int) -> None:
        if device.type == "cuda":  # the current device is per thread
            torch.cuda.set_device(device)
        inputs = self.cache.inputs(index).to(device)
        output = block(*inputs.args, **inputs.kwargs)
        self._blocks_return_tuples = not isinstance(output, torch.Tensor)
        self.cache.stage_output(index, hidden_states_of(output))
