"""Compressing a model from its checkpoint directory with one block in memory at a time.

``oneshot(model=DIR, ..., output_dir=OUT, out_of_core=True)`` builds the model empty from
``DIR`` (:class:`~lightning_compress.pipelines.checkpoint_source.CheckpointSource`) and runs the
sequential pipeline with a :class:`CheckpointResidency`: the modules outside the blocks
(embeddings, final norm, head) are read to capture the first block's inputs and freed; each
block is read, calibrated and compressed, written to the output's work directory
(:class:`~lightning_compress.export.streaming.StreamingCheckpoint`) with the next block's
inputs, and freed; the modules outside the blocks are read again after the last block,
compressed where the recipe says so, and written last; then the checkpoint is published.
Memory holds one block (and its statistics), the modules outside the blocks while they are
used, and the activation cache (on the CPU, or on disk with ``offload_dir``), whatever the
model's depth. The same command run again after a failure resumes after the last block
written, from its saved outputs.

Under several processes (Lightning's ``ddp``, ``ddp_fork`` or ``ddp_spawn``) every rank reads
the same block from the memory-mapped shards and calibrates it on its share of the data; the
statistics are reduced and each layer solved on one owner rank as in memory, so every rank
ends with the same block. Only rank zero opens the output and writes its parts (the other
ranks never write them), and an error writing it is raised on every rank. After each block,
every rank saves its own share of the next block's inputs into the output's work directory
(where rank zero stages and records them), so a resumed run under the same number of
processes continues after the last block written, each rank from its share. Under another
number of processes, or where a rank cannot see the work directory (no shared file system),
the blocks are computed again instead; those written are not written again.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from loguru import logger
from torch import nn

from lightning_compress.core.distributed import all_gather_or_raise, rank_and_world_size
from lightning_compress.export.errors import ExportError
from lightning_compress.export.manifest import Manifest, checkpoint_fingerprint
from lightning_compress.export.streaming import (
    SavedInputs,
    StreamingCheckpoint,
    is_disk_full,
    load_block_inputs,
    save_block_inputs,
)
from lightning_compress.export.writer import check_output_dir
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers.pruning.structure import SPARSITY_THRESHOLD
from lightning_compress.pipelines.cache import ActivationCache
from lightning_compress.pipelines.checkpoint_source import CheckpointSource
from lightning_compress.summary import sparsity_label

__all__ = [
    "CheckpointResidency",
    "OutOfCoreCalibration",
    "run_inputs",
    "spawns_workers",
    "weights_written_to",
]

Modules = Sequence[tuple[str, nn.Module]]
T = TypeVar("T")


class CheckpointResidency:
    """Reads a :class:`CheckpointSource` model's weights when the sequential pipeline needs
    them, and writes each compressed block to a :class:`StreamingCheckpoint` before freeing it
    (a ``WeightResidency``). ``open`` the output before the calibration starts.

    Under ``torch.distributed`` only rank zero opens and writes the output; what it raises
    doing so is raised on every rank (a collective after each write).

    Args:
        source: the model's checkpoint.
    """

    def __init__(self, source: CheckpointSource) -> None:
        self.source = source
        self.outside: list[str] = []
        self.written_labels: dict[str, str] = {}
        self._written: dict[str, dict[str, tuple[int, int]]] = {}
        self._checkpoint: StreamingCheckpoint | None = None
        self._started = False
        self._settings: tuple[str | Path, Any, dict[str, Any], bool] | None = None
        self._warned_unseen = False

    @property
    def checkpoint(self) -> StreamingCheckpoint:
        """The output being written.

        Raises:
            RuntimeError: before the calibration starts.
        """
        if self._checkpoint is None:
            raise RuntimeError("the output checkpoint is opened when the calibration starts")
        return self._checkpoint

    def open(
        self, output_dir: str | Path, recipe: Any, inputs: dict[str, Any], overwrite: bool
    ) -> None:
        """Checks that the output may be written; it is opened (or resumed) when the
        calibration starts, once the modifiers have untied the weights they compress.

        Args:
            output_dir: the checkpoint directory.
            recipe: the recipe (saved with it, part of the run's identity).
            inputs: a fingerprint of the run's inputs (model files, data, settings).
            overwrite: replace ``output_dir`` at the end if it exists.

        Raises:
            ExportError: if ``output_dir`` exists and is not empty (without ``overwrite``) or
                cannot be written.
        """
        check_output_dir(output_dir, overwrite)
        self._settings = (output_dir, recipe, inputs, overwrite)

    def close(self) -> None:
        """Releases the output checkpoint (its work directory stays, to resume)."""
        if self._checkpoint is not None:
            self._checkpoint.close()

    def load_outside(self, modules: Modules) -> None:
        """Reads the modules outside the blocks (and remembers them for ``finish``).

        Args:
            modules: ``(name, module)`` of the modules outside the blocks.
        """
        self.outside = [name for name, _ in modules]
        if not self._started:
            self._started = True
            self._on_rank_zero(self._open_checkpoint)
        for _, module in modules:
            self.source.load(module)

    def release_outside(self, modules: Modules) -> None:
        """Frees the modules outside the blocks.

        Args:
            modules: ``(name, module)`` of the modules outside the blocks.
        """
        for _, module in modules:
            self.source.release(module)

    def load_block(self, name: str, block: nn.Module) -> None:
        """Reads one block.

        Args:
            name: the block's name.
            block: the block.
        """
        self.source.load(block)

    def resume(self, cache: ActivationCache) -> int:
        """The first block to calibrate: the one whose inputs an earlier run of the same
        command saved (every block before it written), with ``cache`` filled with this
        rank's share of them.

        Under several processes each rank reads its own share. Inputs saved under another
        number of processes, or that a rank cannot read (a work directory on no file
        system it shares with rank zero), are not used: every rank computes the blocks
        again (those written are not written again).

        Args:
            cache: an empty activation cache.

        Returns:
            The block's index; 0 when nothing was saved or it is not used.
        """
        rank, world_size = rank_and_world_size()
        saved = self._on_rank_zero(lambda: self._saved_inputs(world_size))
        if saved is None:
            return 0
        readable = all_gather_or_raise(saved.share(rank).is_dir(), None)
        if not all(readable):
            if rank == 0:
                logger.warning(
                    "the inputs of block {} that an earlier run saved in {} cannot be read by "
                    "ranks {}; every rank computes the blocks before it again",
                    saved.block,
                    saved.directory,
                    [index for index, ok in enumerate(readable) if not ok],
                )
            return 0
        error = None
        try:
            load_block_inputs(saved, rank, cache)
        except Exception as caught:
            error = caught
        all_gather_or_raise(None, error)
        if rank == 0:
            logger.info(
                "resuming after the {} blocks an earlier run wrote{}",
                saved.block,
                "" if world_size == 1 else f", each of the {world_size} ranks from its inputs",
            )
        self.written_labels.update(self._on_rank_zero(self._earlier_labels))
        return saved.block

    def finish_block(self, index: int, name: str, block: nn.Module, cache: ActivationCache) -> None:
        """Writes one compressed block to the output (unless an earlier run of the same
        command did), saves the next block's inputs (each rank its share) to resume from,
        and frees the block.

        Args:
            index: the block's position.
            name: the block's name.
            block: the block.
            cache: the activation cache, holding the next block's inputs.
        """
        staging = self._on_rank_zero(lambda: self._write_block(index, name))
        self._save_inputs(index + 1, staging, cache)
        self._note_sparsity(name, block)
        self.source.release(block)
        self._written[name] = _tensor_versions(block)

    def finish(self, tokenizer: Any | None) -> Path:
        """Writes the modules outside the blocks and publishes the checkpoint.

        Args:
            tokenizer: saved with the checkpoint, if given.

        Returns:
            The checkpoint directory (on every rank; rank zero writes it).
        """
        model = self.source.model
        changed = [
            name
            for name, versions in self._written.items()
            if _tensor_versions(model.get_submodule(name)) != versions
        ]
        if changed:
            raise RuntimeError(
                f"the recipe changed blocks {changed} after they were compressed and written "
                f"(when the calibration ended or the session was finalized); their written "
                f"weights would miss the change, so the checkpoint is not finished: compress "
                f"this recipe in memory (without out_of_core)"
            )

        def publish() -> None:
            if self.outside and not self.checkpoint.is_finished(self.outside):
                self.checkpoint.write_modules(model, self.outside)
            self.checkpoint.finish(model, tokenizer)

        for name in self.outside:
            self._note_sparsity(name, model.get_submodule(name))
        self._on_rank_zero(publish)
        for name in self.outside:
            self.source.release(model.get_submodule(name))
        return Path(self._settings[0])

    def _open_checkpoint(self) -> None:
        output_dir, recipe, inputs, overwrite = self._settings
        self._checkpoint = StreamingCheckpoint.open(
            output_dir, self.source.model, recipe, inputs, overwrite
        )

    def _saved_inputs(self, world_size: int) -> SavedInputs | None:
        """The block inputs an earlier run saved, if this run can use them."""
        saved = self.checkpoint.saved_activations()
        if saved is not None and saved.processes != world_size:
            logger.info(
                "the inputs of block {} that an earlier run saved are the shares of {} "
                "processes and this run has {}: the blocks before it are computed again (the "
                "{} parts written are kept)",
                saved.block,
                saved.processes,
                world_size,
                len(self.checkpoint.finished),
            )
            return None
        return saved

    def _write_block(self, index: int, name: str) -> Path:
        """Writes block ``name`` (unless written) and stages the next block's inputs."""
        if not self.checkpoint.is_finished(name):
            self.checkpoint.write_modules(self.source.model, name)
        return self.checkpoint.stage_activations(index + 1)

    def _save_inputs(self, block_index: int, staging: Path, cache: ActivationCache) -> None:
        """Every rank saves its share of block ``block_index``'s inputs in ``staging``;
        rank zero records them (or, where a rank cannot see ``staging``, drops them)."""
        rank = rank_and_world_size()[0]
        batches, error = None, None
        if staging.is_dir():
            try:
                batches = save_block_inputs(staging, rank, cache)
            except Exception as caught:
                error = caught
                if is_disk_full(caught):
                    error = ExportError(
                        f"the disk is full saving rank {rank}'s inputs of block {block_index} "
                        f"in {str(staging)!r} ({caught}); the blocks before it are written "
                        f"and kept: free space and run the same command again to continue"
                    )
        try:
            shares = all_gather_or_raise(batches, error)
        except BaseException:
            if rank == 0:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._on_rank_zero(lambda: self._commit_inputs(block_index, staging, shares))

    def _commit_inputs(self, block_index: int, staging: Path, shares: list[int | None]) -> None:
        unseen = [rank for rank, batches in enumerate(shares) if batches is None]
        if not unseen:
            self.checkpoint.commit_activations(block_index, staging, shares)
            return
        shutil.rmtree(staging, ignore_errors=True)
        if not self._warned_unseen:
            self._warned_unseen = True
            logger.warning(
                "ranks {} cannot see the work directory {} (it is on no file system they "
                "share with rank zero): the block inputs are not saved, and a resumed run "
                "computes the blocks again",
                unseen,
                self.checkpoint.work_dir,
            )

    @staticmethod
    def _on_rank_zero(step: Callable[[], T]) -> T:
        """Runs ``step`` on rank zero only; what it returns is returned on every rank, what
        it raises is raised on every rank."""
        value, error = None, None
        if rank_and_world_size()[0] == 0:
            try:
                value = step()
            except Exception as caught:
                error = caught
        return all_gather_or_raise(value, error)[0]

    def _earlier_labels(self) -> dict[str, str]:
        """The labels of the layers an earlier run compressed and wrote, for the summary."""
        labels = {}
        manifest = Manifest.load(self.checkpoint.work_dir)
        for part in manifest.parts if manifest is not None else []:
            pruned = {
                name: "2:4 sparse" if two_four else "unstructured sparse"
                for name, (numel, zeros, two_four) in part.sparsity.items()
                if zeros >= SPARSITY_THRESHOLD * numel
            }
            for name in {*part.schemes, *pruned}:
                kinds = ["quantized"] if name in part.schemes else []
                kinds += [pruned[name]] if name in pruned else []
                labels[name] = f"{' + '.join(kinds)}, written by an earlier run"
        return labels

    def _note_sparsity(self, name: str, module: nn.Module) -> None:
        for layer_name, layer in module.named_modules(prefix=name):
            label = sparsity_label(getattr(layer, "weight", None))
            if label is not None:
                self.written_labels[layer_name] = label


class OutOfCoreCalibration(CalibrationModule):
    """A :class:`CalibrationModule` over a model read from its checkpoint, which publishes the
    output checkpoint where the calibration ran, once the session is finalized: in this
    process, or in the processes a spawning strategy (``ddp_fork``, ``ddp_spawn``) starts
    (rank zero writes it).

    Args:
        model: the empty model of ``residency``'s source.
        recipe: the recipe.
        residency: reads and writes the model's weights (``open`` called).
        tokenizer: saved with the checkpoint, if given.
        logs_summary: log the summary (at INFO, on rank zero) where the checkpoint is
            published in a process that a spawning strategy started (the calling process
            never sees the workers' summary).
        **kwargs: the other arguments of :class:`CalibrationModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        recipe: Any,
        residency: CheckpointResidency,
        tokenizer: Any | None = None,
        logs_summary: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, recipe, residency=residency, **kwargs)
        self.tokenizer = tokenizer
        self.logs_summary = logs_summary

    def calibrate(self, batches: Iterable[Any] = ()) -> nn.Module:
        """Runs the whole calibration in this process and publishes the checkpoint.

        Args:
            batches: the calibration batches; none for data-free recipes.

        Returns:
            The (empty) model.
        """
        model = super().calibrate(batches)
        self._publish()
        return model

    def on_validation_end(self) -> None:
        super().on_validation_end()
        path = self._publish()
        trainer = self.trainer
        if self.logs_summary and trainer.is_global_zero and spawns_workers(trainer):
            self.summary.record_checkpoint(path)
            self.summary.log()

    def _publish(self) -> Path:
        with self.summary.phase("save"):
            return self.options.residency.finish(self.tokenizer)


def spawns_workers(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` runs in worker processes it starts (``ddp_fork``, ``ddp_spawn``),
    which cannot hand the model back to the calling process.

    Args:
        trainer: the Trainer.

    Returns:
        True for Lightning's multiprocessing launcher.
    """
    return isinstance(trainer.strategy.launcher, _MultiProcessingLauncher)


def _tensor_versions(module: nn.Module) -> dict[str, tuple[int, int]]:
    """Each tensor's identity and in-place version: what changes when anything writes it."""
    return {
        name: (id(tensor), tensor._version)
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]
    }


def run_inputs(
    source: CheckpointSource, samples: Sequence[Any] | None, settings: dict[str, Any]
) -> dict[str, Any]:
    """What an out-of-core run reads, for its output's manifest: a run started again with
    other inputs is refused instead of resumed.

    Args:
        source: the model's checkpoint.
        samples: the calibration samples (None: data-free).
        settings: the options that change the result (JSON values).

    Returns:
        The checkpoint's fingerprint (config, shard headers and sizes), the SHA-256 of the
        samples' token ids and masks, and ``settings``.
    """
    return {
        "model": checkpoint_fingerprint(source.files.directory),
        "samples": None if samples is None else _samples_digest(samples),
        "settings": settings,
    }


def _samples_digest(samples: Sequence[Any]) -> str:
    digest = hashlib.sha256()
    for sample in samples:
        values = sample.items() if isinstance(sample, dict) else [("input_ids", sample)]
        for key, value in sorted(values, key=lambda item: item[0]):
            tensor = torch.as_tensor(value).detach().cpu().contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def weights_written_to(model: nn.Module, output_dir: Path) -> nn.Module:
    """Marks ``model``, whose compressed weights are in ``output_dir`` only (all on the meta
    device), so that running it raises an error saying where they are.

    Args:
        model: the empty model.
        output_dir: the checkpoint its weights were written to.

    Returns:
        ``model``.
    """

    def refuse(module: nn.Module, args: Any, kwargs: Any) -> None:
        raise RuntimeError(
            f"{type(module).__name__} was compressed from its checkpoint one block at a time: "
            f"its weights are not in memory but in {str(output_dir)!r}; load them with "
            f"AutoModelForCausalLM.from_pretrained({str(output_dir)!r}) (or "
            f"lightning_compress.export.load_compressed)"
        )

    model.register_forward_pre_hook(refuse, with_kwargs=True)
    return model
