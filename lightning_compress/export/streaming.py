"""A compressed-tensors checkpoint written part by part (block by block), resumable after a kill.

A run that compresses a model one decoder block at a time writes each block's tensors as
soon as they are final and frees them. :class:`StreamingCheckpoint` keeps those parts in a
hidden work directory beside the target, ``.<name>.streaming``, which survives a crash:

* each part's tensors go to their own safetensors files (``part-00003-00001.safetensors``),
  fsynced, then the part is recorded in ``manifest.json`` (rewritten atomically), with
  what the checkpoint's index, ``config.json`` and ``sparsity.json`` need of it, so the
  finished modules' weights may be freed (back on the meta device);
* the manifest names the run (:func:`~lightning_compress.export.manifest.run_identity`): the
  same run opened again reports the finished parts, a different recipe, model or input is
  refused, naming what differs;
* the block inputs may be saved after a block (:meth:`StreamingCheckpoint.save_activations`;
  under several processes each saves its own share: :meth:`~StreamingCheckpoint.stage_activations`,
  :func:`save_block_inputs`, :meth:`~StreamingCheckpoint.commit_activations`) so a resumed
  run continues without recomputing the finished blocks;
* :meth:`StreamingCheckpoint.finish` links the parts' files into a staged directory under
  transformers' shard names, writes the index, config (with the ``quantization_config``),
  sparsity record, recipe, generation config and tokenizer, and publishes it as the target
  by rename (:func:`~lightning_compress.export.staging.staged_directory`), then removes the
  work directory. Until then the target is untouched: it never looks complete early.

The tensors are those :func:`~lightning_compress.export.save.save_compressed` writes for the
same modules (same names, dtypes and bytes), computed by the same functions.

Disk use: the parts take the checkpoint's size once (the finished checkpoint shares their
files through hard links, or copies them where the file system has none). Saved block
inputs take, per calibration batch, the hidden states and the arguments every block reads
(masks, positions): about ``batches * sequence length * hidden size * dtype size`` bytes,
twice while a newer copy replaces the older one.
"""

from __future__ import annotations

import copy
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from loguru import logger
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_compress.export.errors import ExportError
from lightning_compress.export.expert_readback import misread_expert_formats
from lightning_compress.export.manifest import (
    MANIFEST_NAME,
    Manifest,
    Part,
    identity_differences,
    run_identity,
)
from lightning_compress.export.models import checkpoint_config, find_exportable
from lightning_compress.export.quantization_config import attention_schemes, config_from_schemes
from lightning_compress.export.readback import ReadBackCheck
from lightning_compress.export.save import check_local, refuse_partly_compressed, write_metadata
from lightning_compress.export.schemes import check_finished, named_modules_within, quantized_layers
from lightning_compress.export.sparsity import LayerSparsity, layer_sparsity, summarize_sparsity
from lightning_compress.export.staging import fsync_path, recover_checkpoint, staged_directory
from lightning_compress.export.tensors import compressed_state_dict, state_within, tied_names
from lightning_compress.export.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    SHARD_METADATA,
    check_output_dir,
    creation_mode,
    plan_shards,
    shard_names,
    tensor_nbytes,
    write_index,
)
from lightning_compress.layers.conv1d import conv1d_orientation
from lightning_compress.layers.expert_names import to_checkpoint_names
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.kv_cache import AttentionScheme
from lightning_compress.recipe import Recipe, RecipeInput

__all__ = [
    "WORK_SUFFIX",
    "BlockInputsCache",
    "SavedInputs",
    "StreamingCheckpoint",
    "is_disk_full",
    "load_block_inputs",
    "save_block_inputs",
]

WORK_SUFFIX = ".streaming"
"""The work directory of a checkpoint ``<dir>/<name>`` is ``<dir>/.<name>.streaming``."""

LOCK_NAME = "lock"
ACTIVATIONS_PREFIX = "activations-"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR = re.compile(r"os error (\d+)")


class BlockInputsCache(Protocol):
    """What :meth:`StreamingCheckpoint.save_activations` reads of an activation cache (the
    sequential pipeline's ``ActivationCache``): one ``BlockInputs`` per calibration batch."""

    def __len__(self) -> int:
        """The number of batches."""

    def inputs(self, index: int) -> Any:
        """The current block's inputs of batch ``index``."""

    def append(self, inputs: Any) -> None:
        """Adds one batch's inputs."""


@dataclass(frozen=True)
class SavedInputs:
    """Block inputs a run saved, each process's share in its own directory.

    Attributes:
        block: the decoder block whose inputs they are.
        directory: their directory in the work directory.
        ranks: the number of batches each process saved, by rank; None for a save of one
            process from before shares were kept apart (its batches directly in
            ``directory``).
        batches: the number of batches of all processes.
    """

    block: int
    directory: Path
    ranks: list[int] | None
    batches: int

    @property
    def processes(self) -> int:
        """How many processes saved them."""
        return 1 if self.ranks is None else len(self.ranks)

    def share(self, rank: int) -> Path:
        """The directory of process ``rank``'s batches."""
        return self.directory if self.ranks is None else _share(self.directory, rank)


def save_block_inputs(staging: Path, rank: int, cache: BlockInputsCache) -> int:
    """Saves one process's share of a block's inputs, batch by batch (``torch.save``,
    exact), each file fsynced.

    Args:
        staging: the directory of :meth:`StreamingCheckpoint.stage_activations`.
        rank: the process whose share this is.
        cache: its activation cache.

    Returns:
        The number of batches saved.

    Raises:
        OSError: when a file cannot be written (the disk is full, ``staging`` is missing).
    """
    share = _share(staging, rank)
    share.mkdir()
    for batch in range(len(cache)):
        file = share / f"batch-{batch:05d}.pt"
        torch.save(cache.inputs(batch), file)
        fsync_path(file)
    fsync_path(share)
    return len(cache)


def load_block_inputs(saved: SavedInputs, rank: int, cache: BlockInputsCache) -> None:
    """Appends process ``rank``'s share of saved block inputs to an empty activation cache.

    Args:
        saved: the saved inputs (:meth:`StreamingCheckpoint.saved_activations`).
        rank: the process whose share to read.
        cache: an empty activation cache.

    Raises:
        ValueError: when ``cache`` is not empty, or ``rank`` saved no share.
        OSError: when a file cannot be read.
    """
    if len(cache):
        raise ValueError(f"cache: expected an empty activation cache, got {len(cache)} batches")
    if not 0 <= rank < saved.processes:
        raise ValueError(f"rank: expected one of the {saved.processes} that saved, got {rank}")
    batches = saved.batches if saved.ranks is None else saved.ranks[rank]
    for batch in range(batches):
        # Files this checkpoint wrote itself; block arguments may hold non-tensor objects.
        cache.append(torch.load(saved.share(rank) / f"batch-{batch:05d}.pt", weights_only=False))


class StreamingCheckpoint:
    """A checkpoint written part by part into a work directory that survives a kill.

    Made by :meth:`open`; written by :meth:`write_modules` (one call per decoder block, the
    embeddings and the head), completed by :meth:`finish`. Holds an exclusive lock on the
    work directory until :meth:`close` (or :meth:`finish`), so two processes never write one
    run. Use it as a context manager to close it on any error.

    Module names are those of the exportable model (``model.layers.3``, ``lm_head``). The
    model given to :meth:`finish` must have the structure the parts were written from (the
    same modules, linearized experts included); the finished parts' weights are not read.

    Example::

        with StreamingCheckpoint.open(output_dir, model, recipe, inputs) as checkpoint:
            cache = ActivationCache()
            start = checkpoint.load_activations(cache)  # None: start from the embeddings
            for index, block in enumerate(blocks):
                if checkpoint.is_finished(f"model.layers.{index}"):
                    continue
                ...  # load, compress and run block ``index`` (from ``start``)
                checkpoint.write_modules(model, f"model.layers.{index}")
                checkpoint.save_activations(index + 1, cache)
            checkpoint.write_modules(model, ["model.norm", "lm_head"])
            checkpoint.finish(model, tokenizer)
    """

    def __init__(
        self,
        path: Path,
        work: Path,
        lock: int,
        manifest: Manifest,
        aliases: list[str],
        overwrite: bool,
        max_shard_bytes: int,
        pack_asymmetric: bool,
    ) -> None:
        """Use :meth:`open`."""
        self._path = path
        self._work = work
        self._lock: int | None = lock
        self._manifest = manifest
        self._aliases = set(aliases)
        self._overwrite = overwrite
        self._max_shard_bytes = max_shard_bytes
        self._pack_asymmetric = pack_asymmetric
        self._check = ReadBackCheck()

    @classmethod
    def open(
        cls,
        output_dir: str | os.PathLike,
        model: nn.Module,
        recipe: RecipeInput | None = None,
        inputs: dict[str, Any] | None = None,
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        pack_asymmetric: bool = False,
    ) -> StreamingCheckpoint:
        """Starts writing a checkpoint to ``output_dir``, or resumes the same run.

        Args:
            output_dir: the checkpoint directory, created by :meth:`finish`.
            model: the exportable model (its weights may be on the meta device): its config,
                module names and tied weights are read, not its weights.
            recipe: the recipe compressing it (anything ``Recipe.create_instance`` reads),
                saved as ``recipe.yaml`` and part of the run's identity.
            inputs: a fingerprint of what the run reads, JSON values: e.g.
                ``{"model": checkpoint_fingerprint(model_dir), "dataset": ...}``
                (:func:`~lightning_compress.export.manifest.checkpoint_fingerprint`). A run
                resumed with other inputs is refused.
            overwrite: replace ``output_dir`` at the end if it exists and is not empty.
            max_shard_bytes: the largest safetensors file of a part.
            pack_asymmetric: as in :func:`~lightning_compress.export.save.save_compressed`.

        Returns:
            The checkpoint; :attr:`finished` lists the parts a previous run of the same
            identity completed.

        Raises:
            ExportError: when ``output_dir`` exists, is not empty and ``overwrite`` is false,
                or cannot be written; when another process holds the run; when the run in the
                work directory has another identity (naming each difference: recipe line,
                config key, input file, version or option).
            ValueError: when ``max_shard_bytes`` is not positive or ``inputs`` is not JSON.
            TypeError: for a model that is not exportable.
        """
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes: expected a positive int, got {max_shard_bytes}")
        model = find_exportable(model)
        recover_checkpoint(output_dir)
        _remove_published(Path(output_dir))
        path = check_output_dir(output_dir, overwrite)
        recipe_text = None if recipe is None else Recipe.create_instance(recipe).yaml()
        identity = run_identity(
            recipe_text,
            checkpoint_config(model),
            inputs,
            {"max_shard_bytes": max_shard_bytes, "pack_asymmetric": pack_asymmetric},
        )
        work = _work_dir(path)
        work.mkdir(parents=True, exist_ok=True)
        lock = _lock(work)
        try:
            manifest = Manifest.load(work)
            if manifest is None:
                _refuse_foreign(work)
                manifest = Manifest(identity=identity, recipe=recipe_text)
            else:
                _check_same_run(work, manifest, identity, recipe_text)
                _drop_damaged_parts(work, manifest)
            _remove_unrecorded(work, manifest)
            manifest.save(work)
        except BaseException:
            os.close(lock)
            raise
        if manifest.parts:
            logger.info(
                "resuming {}: {} parts written (last: {})",
                path,
                len(manifest.parts),
                manifest.parts[-1].modules,
            )
        return cls(
            path,
            work,
            lock,
            manifest,
            tied_names(model),
            overwrite,
            max_shard_bytes,
            pack_asymmetric,
        )

    @property
    def path(self) -> Path:
        """The checkpoint directory :meth:`finish` publishes."""
        return self._path

    @property
    def work_dir(self) -> Path:
        """The work directory holding the parts and the manifest until :meth:`finish`."""
        return self._work

    @property
    def finished(self) -> list[list[str]]:
        """The module names of each finished part, in the order they were written."""
        return [list(part.modules) for part in self._manifest.parts]

    @property
    def parts(self) -> list[Part]:
        """The finished parts as the manifest records them (schemes, sparsity measures, ...),
        in the order they were written; copies, for reading."""
        return [copy.deepcopy(part) for part in self._manifest.parts]

    def is_finished(self, modules: str | Sequence[str]) -> bool:
        """Whether a part with exactly these modules is written.

        Args:
            modules: a module name or names, as given to :meth:`write_modules`.

        Returns:
            True when such a part is recorded in the manifest.
        """
        return _module_list(modules) in self.finished

    def write_modules(self, model: nn.Module, modules: str | Sequence[str]) -> None:
        """Writes the tensors of ``modules`` as one finished part.

        Writes what :func:`~lightning_compress.export.save.save_compressed` writes for those
        modules: quantized layers packed in their compressed-tensors format, the rest as
        they are, under the checkpoint's names. The files are fsynced before the part is
        recorded in the manifest, so a crash at any point leaves either the part recorded
        with complete files or not recorded (its files then removed on the next open).
        Afterwards the modules' weights are no longer needed.

        Args:
            model: the exportable model (or a module holding it), as given to :meth:`open`.
            modules: the names of the submodules to write (e.g. ``"model.layers.3"``), all of
                their tensors present (not on the meta device) and compressed.

        Raises:
            ExportError: when a module is already written, or a tensor is still on the meta
                device, or the modules' compression is unfinished, or a layer cannot be
                stored (as ``save_compressed``); when the disk is full (naming the output
                directory, the space needed and free, and the last finished part).
            ValueError: when ``modules`` is empty or names a module the model lacks.
            RuntimeError: when the checkpoint is closed.
        """
        self._check_open()
        names = _module_list(modules)
        model = find_exportable(model)
        self._check_new_modules(model, names)
        refuse_partly_compressed(model)
        state = state_within(model, names, self._aliases)
        _refuse_meta(state)
        check_local(state)
        check_finished(model, within=names)
        layers = quantized_layers(model, self._pack_asymmetric, within=names)
        packed = compressed_state_dict(
            model, layers, within=names, aliases=self._aliases, check=self._check
        )
        misread_expert_formats(model, layers, packed.tensors)
        tensors = to_checkpoint_names(model, conv1d_orientation(model, packed.tensors))
        part = _describe_part(model, names, layers, packed.zeros, tensors, list(state))
        index = len(self._manifest.parts)
        try:
            part.files = self._write_files(tensors, part.tensors, index)
            self._manifest.parts.append(part)
            self._manifest.save(self._work)
        except BaseException as err:
            if self._manifest.parts and self._manifest.parts[-1] is part:
                self._manifest.parts.pop()
            for file in _part_files(self._work, index):
                file.unlink(missing_ok=True)
            if is_disk_full(err):
                raise self._disk_full(f"part {names}", part.nbytes, err) from err
            raise
        logger.debug("wrote part {} ({}): {} bytes", index, names, part.nbytes)

    def save_activations(self, block_index: int, cache: BlockInputsCache) -> None:
        """Saves the inputs of decoder block ``block_index`` (one process's), to resume there
        without recomputing the blocks before it: :meth:`stage_activations`,
        :func:`save_block_inputs` and :meth:`commit_activations` in one call.

        Call it after the parts of the blocks before ``block_index`` are written. Disk use:
        see the module's documentation.

        Args:
            block_index: the block whose inputs these are.
            cache: the activation cache (one ``BlockInputs`` per calibration batch).

        Raises:
            ExportError: when the disk is full (the previous save is kept).
            RuntimeError: when the checkpoint is closed.
        """
        staging = self.stage_activations(block_index)
        try:
            batches = save_block_inputs(staging, 0, cache)
        except BaseException as err:
            nbytes = _tree_bytes(staging)
            shutil.rmtree(staging, ignore_errors=True)
            if is_disk_full(err):
                raise self._disk_full(f"the inputs of block {block_index}", nbytes, err) from err
            raise
        self.commit_activations(block_index, staging, [batches])

    def stage_activations(self, block_index: int) -> Path:
        """A new, empty directory where each process saves its share of the inputs of decoder
        block ``block_index`` (:func:`save_block_inputs`), until :meth:`commit_activations`
        records them (a later :meth:`open` removes it if they never are).

        Args:
            block_index: the block whose inputs are saved there.

        Returns:
            The directory, inside the work directory.

        Raises:
            RuntimeError: when the checkpoint is closed.
        """
        self._check_open()
        staging = self._work / f"{ACTIVATIONS_PREFIX}{block_index:05d}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    def commit_activations(self, block_index: int, staging: Path, batches: Sequence[int]) -> None:
        """Records the inputs saved in ``staging`` as those of block ``block_index``; they
        replace the previous save only now, so a crash keeps one complete save.

        Args:
            block_index: the block whose inputs these are.
            staging: the directory of :meth:`stage_activations`, each process's share saved.
            batches: the number of batches each process saved, by rank.

        Raises:
            ExportError: when the disk is full (the previous save is kept).
            RuntimeError: when the checkpoint is closed.
        """
        self._check_open()
        name = f"{ACTIVATIONS_PREFIX}{block_index:05d}"
        target = self._work / name
        previous = self._manifest.activations
        nbytes = _tree_bytes(staging)
        try:
            fsync_path(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            fsync_path(self._work)
            self._manifest.activations = {
                "block": block_index,
                "batches": sum(batches),
                "ranks": list(batches),
                "directory": name,
                "parts": len(self._manifest.parts),
            }
            self._manifest.save(self._work)
        except BaseException as err:
            self._manifest.activations = previous
            shutil.rmtree(staging, ignore_errors=True)
            if is_disk_full(err):
                raise self._disk_full(f"the inputs of block {block_index}", nbytes, err) from err
            raise
        if previous is not None and previous["directory"] != name:
            shutil.rmtree(self._work / previous["directory"], ignore_errors=True)

    def saved_activations(self) -> SavedInputs | None:
        """The last block inputs saved, if they can be used.

        Returns:
            Where they are and each process's number of batches; None when none are saved,
            or they were saved after parts that are no longer recorded, or are missing.

        Raises:
            RuntimeError: when the checkpoint is closed.
        """
        self._check_open()
        saved = self._manifest.activations
        if saved is None:
            return None
        if saved["parts"] > len(self._manifest.parts):
            logger.warning(
                "the saved inputs of block {} follow parts that are no longer recorded; "
                "they are not used",
                saved["block"],
            )
            return None
        directory = self._work / saved["directory"]
        if not directory.is_dir():
            logger.warning("the saved inputs of block {} are missing; not used", saved["block"])
            return None
        return SavedInputs(saved["block"], directory, saved.get("ranks"), saved["batches"])

    def load_activations(self, cache: BlockInputsCache) -> int | None:
        """Fills an empty activation cache with the last block inputs one process saved.

        Args:
            cache: an empty activation cache; each saved batch is appended in order.

        Returns:
            The block whose inputs they are, or None when none are saved (or they were saved
            after parts that are no longer recorded, or by several processes: then the run
            restarts from its start).

        Raises:
            ValueError: when ``cache`` is not empty.
            RuntimeError: when the checkpoint is closed.
        """
        saved = self.saved_activations()
        if saved is None:
            return None
        if saved.processes != 1:
            logger.info(
                "the saved inputs of block {} are the shares of {} processes; not used by one",
                saved.block,
                saved.processes,
            )
            return None
        load_block_inputs(saved, 0, cache)
        return saved.block

    def finish(self, model: nn.Module, tokenizer: Any | None = None) -> Path:
        """Completes the checkpoint and publishes it as ``output_dir``, then closes.

        Every tensor of the model must be in a finished part. The weights are not read: the
        finished modules may be on the meta device.

        Args:
            model: the exportable model (or a module holding it), as given to :meth:`open`.
            tokenizer: a transformers tokenizer or the bundled ``ByteTokenizer``, saved
                alongside.

        Returns:
            ``output_dir`` as a Path.

        Raises:
            ExportError: when tensors of the model are in no finished part (naming them);
                when ``output_dir`` was created meanwhile and ``overwrite`` is false; when
                the disk is full (nothing is published; call it again after freeing space).
            RuntimeError: when the checkpoint is closed.
            TypeError: for an unsupported tokenizer.
        """
        self._check_open()
        model = find_exportable(model)
        parts = self._manifest.parts
        self._check_covered(model)
        config = checkpoint_config(model)
        qconfig = _quantization_config(model, parts)
        if qconfig is not None:
            config["quantization_config"] = qconfig
        sparsity = summarize_sparsity(_sparsity(model, parts))
        files = [file for part in parts for file in part.files]
        names = dict(zip(files, shard_names(len(files)), strict=True))
        try:
            with staged_directory(self._path, self._overwrite) as staging:
                for file, name in names.items():
                    _link_or_copy(self._work / file, staging / name)
                if len(files) > 1:
                    weight_map = {
                        key: names[file] for part in parts for key, file in part.tensors.items()
                    }
                    write_index(weight_map, sum(part.nbytes for part in parts), staging)
                write_metadata(staging, model, config, tokenizer, self._manifest.recipe, sparsity)
        except OSError as err:
            if is_disk_full(err):
                needed = _copy_bytes(self._work)
                raise self._disk_full("the finished checkpoint", needed, err) from err
            raise
        self.close()
        _remove_work(self._work)
        logger.info("saved {} parts of {} to {}", len(parts), type(model).__name__, self._path)
        return self._path

    def close(self) -> None:
        """Releases the run (its work directory stays, for a later :meth:`open` to resume)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> StreamingCheckpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._lock is None:
            raise RuntimeError(
                f"the streaming checkpoint of {str(self._path)!r} is closed; open it again"
            )

    def _check_new_modules(self, model: nn.Module, names: list[str]) -> None:
        for name in names:
            try:
                model.get_submodule(name)
            except AttributeError as err:
                raise ValueError(
                    f"modules: {type(model).__name__} has no submodule {name!r}"
                ) from err
            for part in self._manifest.parts:
                written = [m for m in part.modules if _overlaps(m, name)]
                if written:
                    raise ExportError(
                        f"module {name!r} is already written (part {part.modules}); skip the "
                        "finished parts listed in StreamingCheckpoint.finished"
                    )

    def _write_files(
        self, tensors: dict[str, Tensor], where: dict[str, str], index: int
    ) -> dict[str, int]:
        """Writes one part's files (fsynced) and fills ``where``; returns each file's size."""
        files = {}
        if not tensors:
            return files
        mode = creation_mode(self._work)
        for number, keys in enumerate(plan_shards(tensors, self._max_shard_bytes), start=1):
            name = f"part-{index:05d}-{number:05d}.safetensors"
            shard = {key: tensors[key].detach().cpu().contiguous() for key in keys}
            _save_shard(shard, self._work / name, mode)
            files[name] = (self._work / name).stat().st_size
            where.update(dict.fromkeys(keys, name))
        fsync_path(self._work)
        return files

    def _check_covered(self, model: nn.Module) -> None:
        covered = {key for part in self._manifest.parts for key in part.covered}
        missing = [
            key for key in model.state_dict() if key not in covered and key not in self._aliases
        ]
        if missing:
            raise ExportError(
                f"{len(missing)} tensors of {type(model).__name__} are in no written part "
                f"(e.g. {missing[:3]}); write their modules with write_modules before finish"
            )

    def _disk_full(self, what: str, needed: int, err: BaseException) -> ExportError:
        free = shutil.disk_usage(self._work).free
        last = self._manifest.parts[-1].modules if self._manifest.parts else None
        return ExportError(
            f"the disk is full writing {what} of checkpoint {str(self._path)!r} (work "
            f"directory {str(self._work)!r}): it needs about {needed} bytes, {free} are free "
            f"({err}). Last finished part: {last if last else 'none'} "
            f"({len(self._manifest.parts)} parts recorded); nothing of this one is kept and "
            f"{str(self._path)!r} is not written. Free space and run the same command again "
            "to continue after the last finished part"
        )


def _share(directory: Path, rank: int) -> Path:
    return directory / f"rank-{rank:05d}"


def _module_list(modules: str | Sequence[str]) -> list[str]:
    names = [modules] if isinstance(modules, str) else list(modules)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"modules: expected a module name or a list of them, got {modules!r}")
    return names


def _overlaps(first: str, second: str) -> bool:
    return (
        not first
        or not second
        or first == second
        or first.startswith(f"{second}.")
        or second.startswith(f"{first}.")
    )


def _refuse_meta(state: dict[str, Tensor]) -> None:
    on_meta = [key for key, tensor in state.items() if tensor.is_meta]
    if on_meta:
        raise ExportError(
            f"{len(on_meta)} tensors to write are on the meta device (e.g. {on_meta[:3]}): "
            "load the modules' weights before writing them"
        )


def _describe_part(
    model: nn.Module,
    names: list[str],
    layers: dict[str, tuple[nn.Module, CTQuantizationScheme]],
    zeros: dict[str, int],
    tensors: dict[str, Tensor],
    covered: list[str],
) -> Part:
    """What the end of the checkpoint needs of a part, from its modules (weights present)."""
    modules = list(named_modules_within(model, names))
    linears = [(name, module) for name, module in modules if isinstance(module, nn.Linear)]
    sparsity = {
        name: list(layer_sparsity(module.weight.detach(), zeros.get(name)))
        for name, module in linears
    }
    inside = {name for name, _ in modules}
    attention = {
        name: {
            "keys_values": scheme.keys_values.to_dict(),
            "queries": None if scheme.queries is None else scheme.queries.to_dict(),
        }
        for name, scheme in attention_schemes(model).items()
        if name in inside
    }
    return Part(
        modules=names,
        files={},
        tensors={},
        nbytes=sum(tensor_nbytes(tensor) for tensor in tensors.values()),
        covered=covered,
        schemes={name: scheme.model_dump(mode="json") for name, (_, scheme) in layers.items()},
        embeddings=[name for name, (m, _) in layers.items() if isinstance(m, nn.Embedding)],
        linears=[name for name, _ in linears],
        attention=attention,
        sparsity=sparsity,
    )


def _module_order(model: nn.Module, parts: list[Part]) -> dict[str, int]:
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    recorded = [
        name
        for part in parts
        for name in (*part.schemes, *part.linears, *part.attention)
        if name not in order
    ]
    if recorded:
        raise ExportError(
            f"the checkpoint's parts name modules {type(model).__name__} does not have "
            f"(e.g. {recorded[:3]}); finish it with the model it was written from"
        )
    return order


def _quantization_config(model: nn.Module, parts: list[Part]) -> dict[str, Any] | None:
    order = _module_order(model, parts)
    schemes = {
        name: CTQuantizationScheme.model_validate(scheme)
        for part in parts
        for name, scheme in part.schemes.items()
    }
    attention = {
        name: AttentionScheme(
            QuantizationArgs.from_dict(scheme["keys_values"]),
            None if scheme["queries"] is None else QuantizationArgs.from_dict(scheme["queries"]),
        )
        for part in parts
        for name, scheme in part.attention.items()
    }
    return config_from_schemes(
        dict(sorted(schemes.items(), key=lambda item: order[item[0]])),
        {name for part in parts for name in part.embeddings},
        sorted((name for part in parts for name in part.linears), key=order.__getitem__),
        dict(sorted(attention.items(), key=lambda item: order[item[0]])),
    )


def _sparsity(model: nn.Module, parts: list[Part]) -> dict[str, LayerSparsity]:
    order = _module_order(model, parts)
    layers = {
        name: LayerSparsity(*measure) for part in parts for name, measure in part.sparsity.items()
    }
    return dict(sorted(layers.items(), key=lambda item: order[item[0]]))


def _save_shard(tensors: dict[str, Tensor], path: Path, mode: int) -> None:
    """Writes one safetensors file and flushes it to disk.

    Raises:
        OSError: when writing fails (safetensors' own errors carry the OS error number).
    """
    try:
        save_file(tensors, path, metadata=SHARD_METADATA)
    except SafetensorError as err:
        match = _OS_ERROR.search(str(err))
        if match is None:
            raise
        number = int(match.group(1))
        raise OSError(number, os.strerror(number), str(path)) from err
    # safetensors writes a private temporary file (0600) and renames it
    os.chmod(path, mode)
    fsync_path(path)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` says the disk (or the quota) is full."""
    return isinstance(err, OSError) and err.errno in _DISK_FULL


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target)


def _copy_bytes(work: Path) -> int:
    return sum(file.stat().st_size for file in work.glob("part-*.safetensors"))


def _tree_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.rglob("*") if file.is_file())


def _part_files(work: Path, index: int) -> list[Path]:
    return list(work.glob(f"part-{index:05d}-*"))


def _lock(work: Path) -> int:
    lock = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(lock)
        raise ExportError(
            f"another process is writing the checkpoint in {str(work)!r}; wait for it to end "
            "(or stop it) before resuming this run"
        ) from err
    return lock


def _check_same_run(
    work: Path, manifest: Manifest, identity: dict[str, Any], recipe_text: str | None
) -> None:
    differences = identity_differences(manifest.identity, identity, manifest.recipe, recipe_text)
    if differences:
        raise ExportError(
            f"{str(work)!r} holds {len(manifest.parts)} finished parts of another run; it "
            f"differs from this one in: {'; '.join(differences)}. Run it as it was started "
            f"to resume it, or remove {str(work)!r} to start this one"
        )


def _work_dir(path: Path) -> Path:
    return path.parent / f".{path.name}{WORK_SUFFIX}"


def _remove_work(work: Path) -> None:
    """Removes the work directory of a published checkpoint (its files live on in it)."""
    shutil.rmtree(work)


def _remove_published(path: Path) -> None:
    """Removes the work directory a run left after publishing ``path`` (killed before it
    removed it): the published shards are its part files, hard-linked."""
    work = _work_dir(path)
    if not (work / MANIFEST_NAME).is_file() or not path.is_dir():
        return
    try:
        lock = _lock(work)
    except ExportError:
        return  # a run is finishing it now
    try:
        manifest = Manifest.load(work)
        files = [file for part in manifest.parts for file in part.files] if manifest else []
        published = path / shard_names(len(files))[0] if files else None
        if published is not None and published.exists() and published.samefile(work / files[0]):
            _remove_work(work)
            logger.warning("removed {}, left by the run that published {}", work, path)
    except (ExportError, OSError):
        return  # not provably published: left for open to judge
    finally:
        os.close(lock)


def _refuse_foreign(work: Path) -> None:
    """Refuses a work directory without a manifest that holds more than a first open leaves."""
    others = [e.name for e in work.iterdir() if e.name not in (LOCK_NAME, f".{MANIFEST_NAME}.tmp")]
    if others:
        raise ExportError(
            f"{str(work)!r} has no manifest but holds {sorted(others)[:3]}: it is not the work "
            "directory of a streaming checkpoint; move it away or choose another output_dir"
        )


def _drop_damaged_parts(work: Path, manifest: Manifest) -> None:
    """Forgets the parts from the first whose files are missing or changed size."""
    for index, part in enumerate(manifest.parts):
        damaged = [
            file
            for file, size in part.files.items()
            if not (work / file).is_file() or (work / file).stat().st_size != size
        ]
        if damaged:
            logger.warning(
                "{}: files {} of part {} ({}) are missing or changed; that part and the {} "
                "after it are written again",
                work,
                damaged,
                index,
                part.modules,
                len(manifest.parts) - index - 1,
            )
            del manifest.parts[index:]
            return


def _remove_unrecorded(work: Path, manifest: Manifest) -> None:
    """Removes what a crash left in ``work`` that the manifest does not record."""
    kept = {LOCK_NAME, MANIFEST_NAME} | {f for part in manifest.parts for f in part.files}
    if manifest.activations is not None:
        kept.add(manifest.activations["directory"])
    for entry in work.iterdir():
        if entry.name in kept:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
