"""A local transformers checkpoint directory: its config and its safetensors shards, found
and read without loading them (headers only; one tensor at a time, memory-mapped)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointFiles",
    "TensorInfo",
    "read_config",
]

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def read_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a checkpoint directory, checked to exist and hold a JSON object.

    Args:
        directory: the checkpoint directory.

    Returns:
        The config's content.

    Raises:
        FileNotFoundError: if ``directory`` is not a directory with a ``config.json``.
        ValueError: if the file is not valid JSON, or holds no JSON object.
    """
    directory = Path(directory)
    config = directory / CONFIG_NAME
    if not config.is_file():
        what = "a directory without" if directory.is_dir() else "no directory with"
        raise FileNotFoundError(
            f"model: {str(directory)!r} is {what} a {CONFIG_NAME}; expected a transformers "
            f"checkpoint directory (config.json, weights, tokenizer), e.g. from "
            f"save_pretrained"
        )
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"model: {config} is not valid JSON ({error})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"model: {config} holds a {type(loaded).__name__}; expected an object")
    return loaded


@dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor is, and what it is.

    Args:
        file: the name of the safetensors file holding it, in the checkpoint directory.
        shape: its shape.
        dtype: its dtype.
    """

    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Its size in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


class CheckpointFiles:
    """The tensors of a local transformers checkpoint: ``config.json`` and safetensors shards.

    The shards are found through ``model.safetensors.index.json``, or are the one
    ``model.safetensors`` (or, without either, every ``*.safetensors`` file of the directory).
    Only the files' headers are read here; ``tensor`` reads one tensor, memory-mapped.

    Args:
        directory: the checkpoint directory.

    Raises:
        FileNotFoundError: if ``directory`` does not exist, or lacks ``config.json`` or
            safetensors files (the message says which), or the index names a missing file.
        ValueError: if the index is not valid JSON with a ``weight_map``, places a tensor in a
            file that does not hold it, or a tensor is stored twice.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(
                f"model: {str(self.directory)!r} does not exist or is not a directory"
            )
        missing = []
        if not (self.directory / CONFIG_NAME).is_file():
            missing.append(f"{CONFIG_NAME} (the model's configuration)")
        weight_map, files = self._files()
        if not files:
            missing.append(
                f"safetensors weights (no {SINGLE_NAME} nor {INDEX_NAME} with its shards; "
                ".bin checkpoints are not read)"
            )
        if missing:
            raise FileNotFoundError(
                f"model: the checkpoint directory {str(self.directory)!r} has no "
                f"{' and no '.join(missing)}; expected a transformers checkpoint saved with "
                f"save_pretrained(..., safe_serialization=True)"
            )
        self.tensors: dict[str, TensorInfo] = self._headers(files)
        self._check_index(weight_map)

    def config(self) -> dict[str, Any]:
        """The content of the checkpoint's ``config.json`` (see :func:`read_config`)."""
        return read_config(self.directory)

    def tensor(self, name: str) -> torch.Tensor:
        """Reads one stored tensor (memory-mapped; a copy on the CPU is made by the caller).

        Args:
            name: its checkpoint name.

        Returns:
            The tensor, in its stored dtype.

        Raises:
            KeyError: if the checkpoint has no tensor ``name``.
        """
        from safetensors import safe_open

        info = self.tensors.get(name)
        if info is None:
            raise KeyError(f"the checkpoint {str(self.directory)!r} has no tensor {name!r}")
        with safe_open(self.directory / info.file, framework="pt") as handle:
            return handle.get_tensor(name)

    @property
    def nbytes(self) -> int:
        """The bytes of every stored tensor (what the weights take in memory), from the
        files' headers."""
        return sum(info.nbytes for info in self.tensors.values())

    def floating_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor stored (what transformers loads in
        when the config names none), or None when there is none."""
        for info in self.tensors.values():
            if info.dtype.is_floating_point:
                return info.dtype
        return None

    def _files(self) -> tuple[dict[str, str], list[str]]:
        """The index's weight map (empty without an index) and the shards' file names."""
        index = self.directory / INDEX_NAME
        if index.is_file():
            try:
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            except (ValueError, KeyError, TypeError) as error:
                raise ValueError(
                    f"model: {str(index)!r} is not a safetensors index (JSON with a "
                    f"'weight_map' of tensor names to files): {error}"
                ) from error
            files = list(dict.fromkeys(weight_map.values()))
            absent = [file for file in files if not (self.directory / file).is_file()]
            if absent:
                raise FileNotFoundError(
                    f"model: {str(index)!r} names shards that are not in the directory: {absent}"
                )
            return weight_map, files
        if (self.directory / SINGLE_NAME).is_file():
            return {}, [SINGLE_NAME]
        return {}, sorted(file.name for file in self.directory.glob("*.safetensors"))

    def _headers(self, files: list[str]) -> dict[str, TensorInfo]:
        from safetensors import safe_open

        tensors: dict[str, TensorInfo] = {}
        for file in files:
            with safe_open(self.directory / file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is no mapping)
                    if name in tensors:
                        raise ValueError(
                            f"model: tensor {name!r} is stored twice, in "
                            f"{tensors[name].file!r} and {file!r}"
                        )
                    view = handle.get_slice(name)
                    tensors[name] = TensorInfo(
                        file, tuple(view.get_shape()), _DTYPES[view.get_dtype()]
                    )
        return tensors

    def _check_index(self, weight_map: dict[str, str]) -> None:
        misplaced = [
            name
            for name, file in weight_map.items()
            if name not in self.tensors or self.tensors[name].file != file
        ]
        if misplaced:
            raise ValueError(
                f"model: {str(self.directory / INDEX_NAME)!r} places {misplaced[:5]} in shards "
                "that do not hold them"
            )


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
