"""The activation cache: each calibration batch's block inputs, on the CPU or on disk."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from lightning_compress.core.tensors import map_tensors
from lightning_compress.pipelines.capture import BlockInputs

__all__ = ["ActivationCache"]


class ActivationCache:
    """Holds the inputs of the current block for every calibration batch, off the accelerator.

    Per batch it keeps the arguments shared by all blocks (masks, positions) once, and the
    hidden states of the block being calibrated. A block's outputs are staged beside its
    inputs and become the next block's inputs on ``commit_outputs``. With ``offload_dir``
    every batch is a ``torch.save`` file in a fresh directory under it, read back
    memory-mapped, so host memory holds one batch at a time; the directory is removed on
    ``close``.

    Args:
        offload_dir: where to spill; None keeps everything in CPU memory.
    """

    def __init__(self, offload_dir: str | Path | None = None) -> None:
        self._dir: Path | None = None
        if offload_dir is not None:
            Path(offload_dir).mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="activations-", dir=offload_dir))
        self._shared: list[BlockInputs | Path] = []
        self._hidden: list[torch.Tensor | Path] = []
        self._staged: dict[int, torch.Tensor | Path] = {}

    def __len__(self) -> int:
        return len(self._hidden)

    @property
    def directory(self) -> Path | None:
        """The spill directory, or None when the cache is in memory."""
        return self._dir

    def append(self, inputs: BlockInputs) -> None:
        """Add one batch's inputs to the first block.

        Args:
            inputs: the captured inputs (on any device; stored on the CPU).
        """
        inputs = BlockInputs(*map_tensors((inputs.args, inputs.kwargs), _to_cpu))
        index = len(self._hidden)
        self._shared.append(self._store(inputs.with_hidden_states(None), f"shared_{index}"))
        self._hidden.append(self._store(inputs.hidden_states, f"hidden_{index}"))

    def inputs(self, index: int) -> BlockInputs:
        """The current block's inputs for batch ``index``, on the CPU.

        Args:
            index: the batch.

        Returns:
            The inputs.
        """
        shared = self._load(self._shared[index])
        return shared.with_hidden_states(self._load(self._hidden[index]))

    def stage_output(self, index: int, hidden_states: torch.Tensor) -> None:
        """Keep the current block's output for batch ``index`` until it is committed.

        Args:
            index: the batch.
            hidden_states: the block's output hidden states.
        """
        self._staged[index] = self._store(_to_cpu(hidden_states), f"staged_{index}")

    def commit_outputs(self) -> None:
        """Make the staged outputs the inputs of the next block.

        Raises:
            RuntimeError: if some batch has no staged output.
        """
        if len(self._staged) != len(self._hidden):
            raise RuntimeError(
                f"{len(self._staged)} of {len(self._hidden)} batches have a staged output; "
                f"stage every batch before committing"
            )
        for index, staged in self._staged.items():
            if isinstance(staged, Path):
                os.replace(staged, self._hidden[index])
            else:
                self._hidden[index] = staged
        self._staged.clear()

    def discard_outputs(self) -> None:
        """Forget the staged outputs."""
        for staged in self._staged.values():
            if isinstance(staged, Path):
                staged.unlink(missing_ok=True)
        self._staged.clear()

    def close(self) -> None:
        """Drop everything and remove the spill directory."""
        self._shared.clear()
        self._hidden.clear()
        self._staged.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _store(self, value: object, name: str) -> object:
        if self._dir is None:
            return value
        path = self._dir / f"{name}.pt"
        torch.save(value, path)
        return path

    @staticmethod
    def _load(value: object) -> object:
        if not isinstance(value, Path):
            return value
        # Files this cache wrote itself; block arguments may hold non-tensor objects.
        return torch.load(value, mmap=True, weights_only=False)


def _to_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu")
