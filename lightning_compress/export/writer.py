"""Checkpoint directories and safetensors shards."""

from __future__ import annotations

import json
import os
import stat
import tempfile
import uuid
from pathlib import Path

from safetensors.torch import save_file
from torch import Tensor

from lightning_compress.export.errors import ExportError

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "INDEX_NAME",
    "SINGLE_SHARD_NAME",
    "check_output_dir",
    "creation_mode",
    "plan_shards",
    "shard_names",
    "tensor_nbytes",
    "write_index",
    "write_shards",
]

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_METADATA = {"format": "pt"}
"""The metadata of every safetensors file written (transformers reads ``format``)."""


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Checks that a checkpoint may be written to ``output_dir``.

    Args:
        output_dir: the checkpoint directory.
        overwrite: whether an existing, non-empty directory may be replaced.

    Returns:
        ``output_dir`` as a Path.

    Raises:
        ExportError: when ``output_dir`` is a file, or a non-empty directory and
            ``overwrite`` is false, or it cannot be written (see :func:`_check_writable`).
    """
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise ExportError(f"output directory {str(path)!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ExportError(
            f"output directory {str(path)!r} exists and is not empty; choose another "
            "directory or set overwrite=True to replace it"
        )
    _check_writable(path)
    return path


def _check_writable(path: Path) -> None:
    """Checks that ``path`` can be written by creating and removing a file where it would go.

    The probe goes into the nearest existing directory above ``path``, where the work
    directory of a save is made: a real write, since permission bits do not tell what root,
    read-only mounts or quotas allow.

    Args:
        path: the directory to be written.

    Raises:
        ExportError: naming ``path`` when the nearest existing ancestor is not a directory or
            no file can be created in it.
    """
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ExportError(
            f"output directory {str(path)!r} cannot be created: {str(parent)!r} is a file, "
            "expected a directory"
        )
    try:
        # Unnamed where the OS allows (O_TMPFILE): a process killed here leaves no file.
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise ExportError(
            f"output directory {str(path)!r} is not writable: no file can be created in "
            f"{str(parent)!r} ({error.strerror or error})"
        ) from error


def write_shards(
    tensors: dict[str, Tensor], directory: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> list[str]:
    """Writes ``tensors`` as safetensors files, with an index when there are several.

    Names follow transformers: ``model.safetensors``, or ``model-00001-of-0000N.safetensors``
    plus ``model.safetensors.index.json`` mapping every tensor to its file.

    Args:
        tensors: checkpoint names to tensors (no two may share memory).
        directory: where to write.
        max_shard_bytes: the largest size of one file (a larger single tensor gets its own).

    Returns:
        The file names written.

    Raises:
        ValueError: when ``max_shard_bytes`` is not positive.
    """
    shards = plan_shards(tensors, max_shard_bytes)
    names = shard_names(len(shards))
    weight_map = {}
    mode = creation_mode(directory)
    for name, keys in zip(names, shards, strict=True):
        shard = {key: tensors[key].detach().cpu().contiguous() for key in keys}
        save_file(shard, directory / name, metadata=SHARD_METADATA)
        # safetensors writes a private temporary file (0600) and renames it
        os.chmod(directory / name, mode)
        weight_map.update(dict.fromkeys(keys, name))
    if len(names) > 1:
        write_index(weight_map, sum(tensor_nbytes(t) for t in tensors.values()), directory)
    return names


def shard_names(count: int) -> list[str]:
    """The file names of a checkpoint of ``count`` safetensors files, as transformers names them.

    Args:
        count: the number of files (at least one).

    Returns:
        ``["model.safetensors"]`` for one file, else ``model-00001-of-0000N.safetensors``, ...
    """
    if count == 1:
        return [SINGLE_SHARD_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(weight_map: dict[str, str], total_size: int, directory: Path) -> None:
    """Writes ``model.safetensors.index.json``: which file holds each tensor.

    Args:
        weight_map: checkpoint tensor names to their file names.
        total_size: the bytes of all tensors together.
        directory: the checkpoint directory being written.
    """
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def creation_mode(directory: Path) -> int:
    """The permission bits a new file gets in ``directory`` (``0o666`` less the umask).

    Read from a probe file created and removed there, so the umask is never changed (changing
    it would race with other threads creating files).

    Args:
        directory: an existing, writable directory.

    Returns:
        The mode bits, e.g. ``0o644`` under the usual umask ``022``.
    """
    probe = directory / f".mode-probe-{uuid.uuid4().hex[:12]}"
    descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(descriptor).st_mode)
    finally:
        os.close(descriptor)
        probe.unlink()


def plan_shards(tensors: dict[str, Tensor], max_shard_bytes: int) -> list[list[str]]:
    """Splits ``tensors`` into files of at most ``max_shard_bytes``, keeping their order.

    Args:
        tensors: checkpoint names to tensors.
        max_shard_bytes: the largest size of one file (a larger single tensor gets its own).

    Returns:
        The names in each file (one empty file for no tensors).

    Raises:
        ValueError: when ``max_shard_bytes`` is not positive.
    """
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes: expected a positive int, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor_nbytes(tensor)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    return shards


def tensor_nbytes(tensor: Tensor) -> int:
    """The bytes ``tensor``'s values take in a safetensors file.

    Args:
        tensor: a tensor (on any device, the meta device included).

    Returns:
        Its number of elements times its element size.
    """
    return tensor.numel() * tensor.element_size()
