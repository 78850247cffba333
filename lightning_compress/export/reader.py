"""Reading a checkpoint directory's files, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from lightning_compress.export.errors import ExportError
from lightning_compress.export.writer import INDEX_NAME, SINGLE_SHARD_NAME

__all__ = ["read_json", "read_tensors"]


def read_json(file: Path) -> dict[str, Any]:
    """Reads a JSON object.

    Args:
        file: the file.

    Returns:
        Its content.

    Raises:
        FileNotFoundError: when ``file`` does not exist.
        ExportError: when it is not a JSON object.
    """
    try:
        content = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{file}: not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(content, dict):
        raise ExportError(f"{file}: expected a JSON object, got {type(content).__name__}")
    return content


def read_tensors(path: Path) -> tuple[dict[str, Tensor], dict[str, Path]]:
    """Reads every tensor of a checkpoint: one safetensors file, or the shards of its index.

    Args:
        path: the checkpoint directory.

    Returns:
        The tensors by name, and the file each was read from.

    Raises:
        ExportError: when a file is missing, truncated or corrupt, or a shard lacks tensors
            its index assigns to it.
    """
    index = path / INDEX_NAME
    weight_map = _weight_map(index) if index.exists() else {}
    files = sorted(set(weight_map.values())) or [SINGLE_SHARD_NAME]
    tensors: dict[str, Tensor] = {}
    origin: dict[str, Path] = {}
    for name in files:
        file = path / name
        shard = _read_safetensors(file, index if weight_map else None)
        absent = [key for key, owner in weight_map.items() if owner == name and key not in shard]
        if absent:
            raise ExportError(
                f"{file}: lacks {len(absent)} tensors that {index.name} assigns to it "
                f"(e.g. {absent[0]!r}); the file is incomplete or from another checkpoint"
            )
        tensors.update(shard)
        origin.update(dict.fromkeys(shard, file))
    return tensors, origin


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ExportError(f"{index}: expected a non-empty 'weight_map' object of tensor -> file")
    return weight_map


def _read_safetensors(file: Path, index: Path | None) -> dict[str, Tensor]:
    if not file.is_file():
        listed = f", listed in {index}," if index is not None else ""
        raise ExportError(f"{file}{listed} does not exist; the checkpoint is incomplete")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as err:
        raise ExportError(
            f"{file}: cannot be read as safetensors ({err}); the file is truncated or corrupt"
        ) from err
