"""The manifest of a checkpoint written in parts: what run it belongs to and what is done.

A :class:`~lightning_compress.export.streaming.StreamingCheckpoint` keeps it as
``manifest.json`` in its work directory, rewritten atomically (a temporary file, fsynced,
renamed over it, the directory fsynced) after each part, so after a crash it names exactly
the parts whose files are complete. The run's identity (the recipe, the model's config,
the inputs' fingerprint, the versions and options that change the output) is stored with
it: a run resumed with anything different is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import compressed_tensors
import torch
import transformers

from lightning_compress.export.errors import ExportError
from lightning_compress.export.staging import fsync_path

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "Part",
    "checkpoint_fingerprint",
    "identity_differences",
    "run_identity",
    "write_atomically",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "lightning-compress streaming checkpoint"
MANIFEST_VERSION = 1
_HEADER_LENGTH = struct.Struct("<Q")


@dataclass
class Part:
    """One finished part of the checkpoint (a group of modules, e.g. a decoder block).

    Everything the checkpoint's index, ``config.json`` and ``sparsity.json`` need from these
    modules is kept here, so they are written at the end without the modules' weights.

    Attributes:
        modules: the module names written together, as given.
        files: each safetensors file of the part (in the work directory) to its size.
        tensors: each checkpoint tensor name to the file holding it.
        nbytes: the bytes of the part's tensors.
        covered: the model's state-dict names the part wrote (before packing and renaming).
        schemes: each quantized layer's name to its compressed-tensors scheme (JSON).
        embeddings: the quantized layers that are embeddings.
        linears: every linear layer of the part.
        attention: each calibrated attention module to its scheme (JSON).
        sparsity: each linear layer to ``[numel, zeros, two_four]``.
    """

    modules: list[str]
    files: dict[str, int]
    tensors: dict[str, str]
    nbytes: int
    covered: list[str]
    schemes: dict[str, dict[str, Any]] = field(default_factory=dict)
    embeddings: list[str] = field(default_factory=list)
    linears: list[str] = field(default_factory=list)
    attention: dict[str, dict[str, Any]] = field(default_factory=dict)
    sparsity: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Manifest:
    """The run a work directory belongs to and its finished parts, in order.

    Attributes:
        identity: the run's identity (:func:`run_identity`).
        recipe: the recipe's YAML text, or None.
        parts: the finished parts, in the order they were written.
        activations: the saved block inputs (``block``, ``batches``, ``ranks``: each
            process's batches, ``directory``, and ``parts``: how many parts were finished
            when they were saved), or None.
    """

    identity: dict[str, Any]
    recipe: str | None
    parts: list[Part] = field(default_factory=list)
    activations: dict[str, Any] | None = None

    @classmethod
    def load(cls, directory: Path) -> Manifest | None:
        """Reads the manifest of a work directory.

        Args:
            directory: the work directory.

        Returns:
            The manifest, or None when the directory has none.

        Raises:
            ExportError: naming the file, when it is not a manifest this version reads.
        """
        path = directory / MANIFEST_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("kind") != MANIFEST_KIND or data.get("version") != MANIFEST_VERSION:
                raise ValueError(
                    f"kind {data.get('kind')!r} version {data.get('version')!r}, expected "
                    f"{MANIFEST_KIND!r} version {MANIFEST_VERSION}"
                )
            return cls(
                identity=data["identity"],
                recipe=data["recipe"],
                parts=[Part(**part) for part in data["parts"]],
                activations=data["activations"],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ExportError(
                f"{str(path)!r} is not a manifest this version of lightning-compress reads "
                f"({err}); remove {str(directory)!r} to start the run again"
            ) from err

    def save(self, directory: Path) -> None:
        """Writes the manifest into ``directory``, atomically and durably.

        Args:
            directory: the work directory.

        Raises:
            OSError: when it cannot be written (the previous manifest is then unchanged).
        """
        data = {"kind": MANIFEST_KIND, "version": MANIFEST_VERSION, **asdict(self)}
        write_atomically(directory / MANIFEST_NAME, json.dumps(data, indent=1) + "\n")


def write_atomically(path: Path, text: str) -> None:
    """Replaces ``path`` with ``text`` so that a crash leaves the old or the new content.

    Args:
        path: the file.
        text: its new content.

    Raises:
        OSError: when writing, flushing or renaming fails; the temporary file is removed.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def run_identity(
    recipe_text: str | None,
    model_config: Mapping[str, Any],
    inputs: Mapping[str, Any] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """What a run's output depends on, to refuse resuming it with anything else.

    Args:
        recipe_text: the recipe's YAML, or None (its SHA-256 is kept).
        model_config: the model's ``config.json`` content.
        inputs: the caller's fingerprint of what the run reads (the source checkpoint,
            :func:`checkpoint_fingerprint`; the calibration data), JSON values.
        options: the writer's options that change the output.

    Returns:
        The identity: JSON values only.

    Raises:
        ValueError: when ``inputs`` holds something JSON cannot store.
    """
    try:
        inputs = json.loads(json.dumps(dict(inputs or {}), sort_keys=True))
    except (TypeError, ValueError) as err:
        raise ValueError(f"inputs: expected JSON values (str, number, list, dict): {err}") from err
    recipe_hash = None if recipe_text is None else hashlib.sha256(recipe_text.encode()).hexdigest()
    return {
        "recipe_sha256": recipe_hash,
        "model_config": json.loads(json.dumps(model_config, sort_keys=True, default=str)),
        "inputs": inputs,
        "versions": {
            "lightning_compress": _installed_version("lightning-compress"),
            "compressed_tensors": compressed_tensors.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
        "options": dict(options),
    }


def _installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def identity_differences(
    stored: Mapping[str, Any],
    current: Mapping[str, Any],
    stored_recipe: str | None = None,
    current_recipe: str | None = None,
) -> list[str]:
    """How the identity of a run being resumed differs from the one it started with.

    Args:
        stored: the identity in the manifest.
        current: the identity of the run asking to resume.
        stored_recipe: the recipe text the run started with, to name the first differing line.
        current_recipe: the recipe text now.

    Returns:
        One line per difference, naming it (``recipe: line 3 ...``, ``model_config.hidden_size:
        64 -> 128``, ``inputs.files['model.safetensors'].bytes: ...``); empty when equal.
    """
    found = []
    if stored.get("recipe_sha256") != current.get("recipe_sha256"):
        found.append(f"recipe: {_first_line_difference(stored_recipe, current_recipe)}")
    for section in ("model_config", "inputs", "versions", "options"):
        found.extend(_differences(stored.get(section), current.get(section), section))
    return found


def checkpoint_fingerprint(model_dir: str | os.PathLike) -> dict[str, Any]:
    """A cheap fingerprint of a transformers checkpoint directory, to tell a changed one.

    Reads ``config.json`` and, of each ``*.safetensors`` file, its size, modification time
    and the SHA-256 of its header (the tensors' names, dtypes, shapes and offsets); the
    tensors' bytes are not read.

    Args:
        model_dir: the checkpoint directory.

    Returns:
        ``{"config": <config.json>, "files": {name: {"bytes", "mtime_ns", "header_sha256"}}}``.

    Raises:
        ExportError: naming the directory or file, when ``config.json`` or a safetensors
            header cannot be read.
    """
    directory = Path(model_dir)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise ExportError(
            f"model directory {str(directory)!r}: cannot read config.json ({err}); expected a "
            "transformers checkpoint directory"
        ) from err
    files = {}
    for path in sorted(directory.glob("*.safetensors")):
        stat = path.stat()
        files[path.name] = {
            "bytes": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "header_sha256": _header_hash(path),
        }
    return {"config": config, "files": files}


def _header_hash(path: Path) -> str:
    try:
        with open(path, "rb") as file:
            (length,) = _HEADER_LENGTH.unpack(file.read(_HEADER_LENGTH.size))
            header = file.read(length)
    except (OSError, struct.error) as err:
        raise ExportError(f"cannot read the safetensors header of {str(path)!r}: {err}") from err
    if len(header) != length:
        raise ExportError(
            f"{str(path)!r} is truncated: its safetensors header says {length} bytes, "
            f"{len(header)} are there"
        )
    return hashlib.sha256(header).hexdigest()


def _differences(stored: Any, current: Any, where: str) -> list[str]:
    if isinstance(stored, Mapping) and isinstance(current, Mapping):
        found = []
        for key in list(stored) + [key for key in current if key not in stored]:
            path = f"{where}[{key!r}]" if not str(key).isidentifier() else f"{where}.{key}"
            if key not in current:
                found.append(f"{path}: was {_short(stored[key])}, now missing")
            elif key not in stored:
                found.append(f"{path}: was missing, now {_short(current[key])}")
            else:
                found.extend(_differences(stored[key], current[key], path))
        return found
    if stored != current:
        return [f"{where}: was {_short(stored)}, now {_short(current)}"]
    return []


def _first_line_difference(stored: str | None, current: str | None) -> str:
    if stored is None or current is None:
        before, after = ("none" if text is None else "given" for text in (stored, current))
        return f"was {before}, now {after}"
    old, new = stored.splitlines(), current.splitlines()
    for number, (before, after) in enumerate(zip(old, new, strict=False), start=1):
        if before != after:
            return f"line {number} was {before.strip()!r}, now {after.strip()!r}"
    return f"was {len(old)} lines, now {len(new)}"


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
