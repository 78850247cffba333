"""The checkpoint a model-free run reads: its config, its safetensors tensors and the model
its config describes, built on the meta device (no memory)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_compress.core.checkpoint_files import CONFIG_NAME, CheckpointFiles, TensorInfo
from lightning_compress.export.errors import ExportError

__all__ = ["SourceCheckpoint", "read_checkpoint"]


@dataclass
class SourceCheckpoint:
    """A transformers-format checkpoint directory, read without loading its tensors.

    Attributes:
        files: its config and safetensors files.
        config: the content of its ``config.json``.
    """

    files: CheckpointFiles
    config: dict[str, Any]

    @property
    def path(self) -> Path:
        """The directory."""
        return self.files.directory

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor's name to where it lies, in file order."""
        return self.files.tensors

    @property
    def dtype(self) -> torch.dtype:
        """The dtype most of the floating-point bytes are stored in."""
        sizes: Counter[torch.dtype] = Counter()
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                sizes[info.dtype] += info.nbytes
        return sizes.most_common(1)[0][0] if sizes else torch.float32

    def meta_model(self, trust_remote_code: bool = False) -> nn.Module:
        """The model the config describes, on the meta device, in :attr:`dtype`.

        Args:
            trust_remote_code: let transformers run the checkpoint's own modelling code.

        Returns:
            The model, every parameter on the meta device.

        Raises:
            ExportError: naming the architecture when transformers cannot build it (suggesting
                ``trust_remote_code`` only where it was given), or a tensor whose shape
                differs from the model's parameter of that name.
        """
        from transformers import AutoConfig, AutoModelForCausalLM

        architectures = self.config.get("architectures") or [self.config.get("model_type")]
        try:
            config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(
                    config, dtype=self.dtype, trust_remote_code=trust_remote_code
                )
        except (ValueError, KeyError, ImportError, OSError) as err:
            hint = " (trust_remote_code=True was given)" if trust_remote_code else ""
            raise ExportError(
                f"transformers cannot build {architectures} from {self.path / CONFIG_NAME}"
                f"{hint}: {err}"
            ) from err
        self._check_shapes(model)
        return model

    def _check_shapes(self, model: nn.Module) -> None:
        for name, tensor in model.state_dict().items():
            info = self.tensors.get(name)
            if info is not None and info.shape != tuple(tensor.shape):
                raise ExportError(
                    f"tensor '{name}' in {self.path / info.file} has shape {list(info.shape)}, "
                    f"but the config describes {list(tensor.shape)}; the shards do not match "
                    f"{self.path / CONFIG_NAME}"
                )


def read_checkpoint(model_dir: str | os.PathLike) -> SourceCheckpoint:
    """Reads a checkpoint directory's config and the headers of its safetensors files.

    Args:
        model_dir: a local transformers-format directory: ``config.json`` and
            ``model.safetensors`` or ``model.safetensors.index.json`` with its shards.

    Returns:
        The checkpoint.

    Raises:
        ExportError: naming what is missing or wrong (as
            :class:`~lightning_compress.core.checkpoint_files.CheckpointFiles` says): the
            directory, its ``config.json``, its safetensors files (or a shard the index names),
            a tensor the index places in a file that does not hold it, or one stored twice.
    """
    try:
        files = CheckpointFiles(model_dir)
    except (FileNotFoundError, ValueError) as error:
        raise ExportError(str(error)) from error
    return SourceCheckpoint(files, files.config())
