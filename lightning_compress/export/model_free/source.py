"""The checkpoint a model-free run reads: its config, its safetensors tensors and the model
its config describes, built on the meta device (no memory)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lightning_compress.export.errors import ExportError
from lightning_compress.export.writer import INDEX_NAME, SINGLE_SHARD_NAME

__all__ = ["TensorInfo", "SourceCheckpoint", "read_checkpoint"]

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor of the checkpoint lies, and what it is.

    Attributes:
        file: the safetensors file's name in the checkpoint directory.
        shape: the tensor's shape.
        dtype: its dtype.
        nbytes: its size in bytes.
    """

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


@dataclass
class SourceCheckpoint:
    """A transformers-format checkpoint directory, read without loading its tensors.

    Attributes:
        path: the directory.
        config: the content of its ``config.json``.
        tensors: every tensor's name to where it lies, in file order.
    """

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]

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
        ExportError: naming what is missing: the directory, its ``config.json``, its
            safetensors files (or a shard the index names), or a tensor the index places in a
            file that does not hold it.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise ExportError(f"model directory {str(path)!r} does not exist or is not a directory")
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ExportError(
            f"model directory {str(path)!r} has no {CONFIG_NAME}; expected a transformers-format "
            "checkpoint (config.json and safetensors shards)"
        )
    config = json.loads(config_file.read_text())
    return SourceCheckpoint(path, config, _tensor_infos(path))


def _tensor_infos(path: Path) -> dict[str, TensorInfo]:
    index = path / INDEX_NAME
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    elif (path / SINGLE_SHARD_NAME).is_file():
        weight_map, files = {}, [SINGLE_SHARD_NAME]
    else:
        raise ExportError(
            f"model directory {str(path)!r} has no {SINGLE_SHARD_NAME} nor {INDEX_NAME}; "
            "expected the model's weights as safetensors files (.bin checkpoints are not read)"
        )
    infos: dict[str, TensorInfo] = {}
    for file in files:
        if not (path / file).is_file():
            raise ExportError(f"shard {file!r} named by {path / INDEX_NAME} is missing")
        with safe_open(path / file, framework="pt") as reader:
            for name in reader.keys():  # noqa: SIM118 (safe_open has no __iter__)
                meta = reader.get_slice(name)
                dtype = _DTYPES[meta.get_dtype()]
                shape = tuple(meta.get_shape())
                nbytes = dtype.itemsize * int(torch.Size(shape).numel())
                infos[name] = TensorInfo(file, shape, dtype, nbytes)
    misplaced = [
        name for name, file in weight_map.items() if name not in infos or infos[name].file != file
    ]
    if misplaced:
        raise ExportError(
            f"{path / INDEX_NAME} places {misplaced[:5]} in shards that do not hold them"
        )
    return infos


_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
