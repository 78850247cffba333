"""The calibration pipeline interface: one calibration epoch of a session over a model."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from loguru import logger
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.core.compression_record import (
    RECORD_ATTRIBUTE,
    PartialCompression,
    mark_partial,
)
from lightning_compress.layers import calibrating_all_experts
from lightning_compress.pipelines.cache import ActivationCache
from lightning_compress.pipelines.snapshot import BlockVersions

__all__ = [
    "BlockReport",
    "CalibrationPipeline",
    "PipelineOptions",
    "WeightResidency",
    "placed_on",
]


@dataclass(frozen=True)
class BlockReport:
    """What calibrating one block took.

    Args:
        index: the block's position.
        name: the block's module name.
        seconds: wall time, compression included.
        forwards: block forwards per calibration batch (1, or 2 when statistics were
            gathered and compression changed the block).
    """

    index: int
    name: str
    seconds: float
    forwards: int


class WeightResidency(Protocol):
    """Brings a model's weights into memory when the sequential pipeline needs them and
    takes them out after, for a model whose weights stay on disk (``pipelines.out_of_core``).

    The pipeline calls ``load_outside`` before it captures the first block's inputs and
    ``release_outside`` once they are captured; ``resume`` then says which block to start
    from (the blocks before it are neither loaded nor calibrated: each modifier's
    ``skip_block`` forgets them); ``load_block`` before calibrating each block and
    ``finish_block`` once it is compressed (its outputs computed); ``load_outside`` again
    after the last block, before the modules after the blocks are calibrated. The modules
    outside the blocks stay in memory from then on (the modifiers may compress them until
    the session is finalized): their owner writes and releases them after.

    Attributes:
        written_labels: how each layer whose weights were written and freed is compressed
            where its module no longer shows it (``2:4 sparse``, ``unstructured sparse``,
            or written by an earlier run that this one resumes), by name, for the summary.
    """

    written_labels: Mapping[str, str]

    def load_outside(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        """Reads the weights of the modules outside the blocks.

        Args:
            modules: ``(name, module)`` of the outermost modules that are neither a block nor
                inside one (embeddings, final norm, ``lm_head``).
        """

    def release_outside(self, modules: Sequence[tuple[str, nn.Module]]) -> None:
        """Gives back the memory of the modules outside the blocks.

        Args:
            modules: as for ``load_outside``.
        """

    def load_block(self, name: str, block: nn.Module) -> None:
        """Reads one block's weights.

        Args:
            name: the block's module name.
            block: the block.
        """

    def resume(self, cache: ActivationCache) -> int:
        """Where to start: after the blocks an earlier, interrupted run finished.

        Args:
            cache: an empty activation cache, filled with the saved inputs of the block
                returned (left empty for 0).

        Returns:
            The index of the first block to calibrate (0: from the start).
        """

    def finish_block(self, index: int, name: str, block: nn.Module, cache: ActivationCache) -> None:
        """Takes one compressed block out of memory (after writing it).

        Args:
            index: the block's position.
            name: the block's module name.
            block: the block.
            cache: the activation cache, holding the next block's inputs.
        """


@dataclass
class PipelineOptions:
    """Settings shared by the pipelines; each uses the ones that concern it.

    Args:
        device: where blocks (sequential) or the model (basic) run; None: where they are.
        sequential_targets: class names of the blocks; None finds the repeated blocks.
        offload_dir: spill the activation cache to this directory; None keeps it in memory.
        propagate_compressed: feed each block the outputs of the compressed previous block
            (exact; a second forward for blocks whose statistics were gathered and whose
            forward compression changed). False always reuses the calibration forward's
            outputs: one forward per block, later blocks calibrated without upstream error.
        staged: when every modifier compresses each layer from its own inputs (GPTQ,
            SparseGPT, Wanda, round-to-nearest), calibrate a block in one forward that pauses
            before each group of layers reading one input until it is compressed
            (``pipelines.staged``); its outputs are the compressed block's. It holds every
            batch's activations inside the block at once. False: calibrate the whole block,
            compress it, then run it again.
        progress: show a progress bar over the blocks.
        on_block_end: called after each block with its ``BlockReport``.
        moe_calibrate_all_experts: during calibration every expert of a mixture-of-experts
            block runs on every token, so its statistics come from all tokens, while the
            block's output still follows the router (the reference project's default).
            False: each expert sees only the tokens routed to it.
        residency: reads each block's weights before it is calibrated and takes them out
            after (the sequential pipeline, for a model built empty from its checkpoint);
            None: the model's weights are all in memory.
    """

    device: torch.device | str | None = None
    sequential_targets: list[str] | None = None
    offload_dir: str | Path | None = None
    propagate_compressed: bool = True
    staged: bool = True
    progress: bool = False
    on_block_end: Callable[[BlockReport], None] | None = None
    moe_calibrate_all_experts: bool = True
    residency: WeightResidency | None = None


class CalibrationPipeline:
    """Drives CALIBRATION_EPOCH_START → data → (SEQUENTIAL_EPOCH_END per block) → END.

    The steps are separate methods so that a LightningModule can call them from its hooks
    (``start`` → ``add_batch`` per batch → ``run`` → ``end``); ``__call__`` runs them all.
    The model is put in eval mode for the epoch and given back in its former mode. On any
    error call ``abort``: the modifiers are aborted (their calibration hooks and temporary
    buffers removed), the pipeline's own state is dropped and the model's mode and placement
    restored.

    A failure never leaves a block half compressed, but it does not undo the blocks finished
    before it either: giving the whole model back would need a copy of every original
    weight, as large as the model. The finished blocks keep their full compression state
    (weights, scales, zero points, the quantized forward), so the model stays consistent, and
    ``abort`` says so loudly: it logs an error, adds a note to the exception and leaves a
    :class:`PartialCompression` record on the model (``model.partial_compression``), which
    ``save_compressed`` and the calibration refuse.

    Args:
        model: the session's model.
        session: the initialized session whose modifiers react to the events.
        options: the pipeline settings.
    """

    name: ClassVar[str]

    def __init__(
        self, model: nn.Module, session: CompressionSession, options: PipelineOptions
    ) -> None:
        self.model = model
        self.session = session
        self.options = options
        self.compressed: list[str] = []
        self._modes: dict[nn.Module, bool] = {}
        self._experts_mode = ExitStack()
        self._end_versions: BlockVersions | None = None

    @property
    def block_names(self) -> list[str]:
        """The names of the blocks calibrated one after another (none by default)."""
        return []

    def __call__(self, batches: Iterable[Any]) -> None:
        """Run the whole epoch over ``batches``, aborting on error.

        Args:
            batches: the calibration batches (see ``call_model``).
        """
        try:
            self.start()
            for batch in batches:
                self.add_batch(batch)
            self.run()
            self.end()
        except BaseException as error:
            self.abort(error)
            raise

    def start(self) -> None:
        """Put the model in eval mode (experts in their calibration mode) and emit
        CALIBRATION_EPOCH_START."""
        self._modes = {module: module.training for module in self.model.modules()}
        self.model.eval()
        self._experts_mode.enter_context(
            calibrating_all_experts(self.model, self.options.moe_calibrate_all_experts)
        )
        self.session.event(EventType.CALIBRATION_EPOCH_START)

    def add_batch(self, batch: Any) -> None:
        """Take one calibration batch.

        Args:
            batch: the batch.
        """
        raise NotImplementedError

    def run(self) -> None:
        """Work that needs all the batches (the sequential pipeline's block loop)."""

    def end(self) -> None:
        """Emit CALIBRATION_EPOCH_END and give the model back."""
        self._end_versions = BlockVersions(self.model)
        self.session.event(EventType.CALIBRATION_EPOCH_END)
        self._end_versions = None
        self.close()

    def abort(self, error: BaseException | None = None) -> None:
        """Clean up after an error: modifiers aborted, pipeline state dropped, model given back.

        When blocks were compressed before the failure (or the failure came while the
        modifiers compressed layers at CALIBRATION_EPOCH_END and changed some), the model is
        marked partly compressed (see the class docstring) and ``error`` gets a note saying
        which blocks are. Calling it again does nothing more.

        Args:
            error: the exception that stopped the calibration.
        """
        at_end = self._end_versions is not None and self._end_versions.changed(self.model)
        self._end_versions = None
        self.session.lifecycle.abort()
        self.close()
        if (self.compressed or at_end) and RECORD_ATTRIBUTE not in vars(self.model):
            self._mark_partial(error, at_end)

    def _mark_partial(self, error: BaseException | None, at_end: bool) -> None:
        reason = "unknown error" if error is None else f"{type(error).__name__}: {error}"
        blocks = len(self.block_names)
        record = PartialCompression(tuple(self.compressed), blocks, at_end, reason)
        mark_partial(self.model, record)
        note = (
            f"{type(self.model).__name__} is left partly compressed: {record.describe()}. "
            f"It is recorded as model.{RECORD_ATTRIBUTE}; save_compressed refuses the model "
            f"and so does a new calibration: reload the original model to compress it again"
        )
        logger.error(note)
        if error is not None:
            error.__notes__ = [*getattr(error, "__notes__", []), note]

    def close(self) -> None:
        """Drop the pipeline's state and restore the model's train/eval modes (experts routed)."""
        for module, training in self._modes.items():
            module.training = training
        self._modes = {}
        self._experts_mode.close()


@contextmanager
def placed_on(module: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Move ``module`` to ``device`` inside the context and back to where it was after.

    Args:
        module: the module.
        device: the target; None leaves the module where it is.

    Yields:
        The device the module runs on inside the context.
    """
    home = _device_of(module)
    target = _normalized(device) if device is not None else home
    if target != home:
        module.to(target)
    try:
        yield target
    finally:
        if target != home:
            module.to(home)


def _normalized(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
