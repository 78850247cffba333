"""``out_of_core="auto"``: load a checkpoint, or compress it one block in memory at a time.

The choice compares the checkpoint's weights with the memory available. Under several
processes every rank must choose the same (a rank reading each block from the files and
another holding the whole model would calibrate out of step), so the ranks choose from the
same figures:

* where ``torch.distributed`` is running, each figure is reduced over the ranks: the least
  memory available and the largest weights (a rank that cannot read its memory, or the
  checkpoint, makes every rank load it);
* a process that Lightning's ``ddp`` strategy starts (it runs the script again before the
  ranks are connected) takes the choice of the process that started it, which leaves its
  choices in the environment variable :data:`CHOICES_VARIABLE` (as Lightning passes its
  seed to the processes it starts);
* processes started apart (``torchrun``, SLURM) before ``torch.distributed`` runs cannot
  compare their figures: each chooses alone with a WARNING, and the sequential pipeline
  refuses ranks that chose differently when the calibration starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from loguru import logger

from lightning_compress.core.checkpoint_files import CheckpointFiles
from lightning_compress.core.distributed import (
    all_reduce_max_,
    all_reduce_min_,
    is_distributed,
    rank_and_world_size,
)

__all__ = ["CHOICES_VARIABLE", "MEMORY_SHARE", "available_memory", "choose_out_of_core"]

MEMORY_SHARE = 0.5
"""``out_of_core="auto"`` reads a checkpoint block by block when its weights take more than
this share of the available memory (the rest is for the activations, the statistics, the
compressed copy being built and the other processes)."""
CHOICES_VARIABLE = "LIGHTNING_COMPRESS_OUT_OF_CORE"
"""The environment variable holding this process's ``"auto"`` choices (JSON: checkpoint
directory → true for out of core), read by the processes Lightning's ``ddp`` starts."""
MEMINFO = Path("/proc/meminfo")
GB = 1e9


def available_memory() -> int | None:
    """The memory available to a new process, in bytes.

    Returns:
        ``psutil.virtual_memory().available`` where psutil is installed, else ``MemAvailable``
        of ``/proc/meminfo``; None when neither can be read.
    """
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    try:
        lines = MEMINFO.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        fields = value.split()
        if key == "MemAvailable" and fields:
            return int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
    return None


def choose_out_of_core(
    out_of_core: bool | str, directory: str | Path, blockers: Sequence[str] = ()
) -> bool:
    """Whether to compress the checkpoint in ``directory`` from its files, one block in memory
    at a time, or to load it.

    ``"auto"`` chooses out of core when the weights (the sum of the stored tensors' bytes,
    read from the safetensors headers) take more than :data:`MEMORY_SHARE` of the available
    memory (:func:`available_memory`), and nothing in ``blockers`` rules it out; it logs the
    choice and why at INFO (a WARNING when the weights are too large but a blocker keeps them
    in memory). A checkpoint without safetensors, or memory that cannot be read, is loaded;
    so is a compressed-tensors checkpoint (its ``config.json`` has a ``quantization_config``),
    which loading dequantizes. Under several processes every rank chooses the same (see the
    module's documentation): under ``torch.distributed`` this is a collective call.

    Args:
        out_of_core: True or False (forced), or ``"auto"``.
        directory: the checkpoint directory.
        blockers: what rules out-of-core out for this run, each said as a phrase (``"no
            output_dir is given"``); the same on every rank.

    Returns:
        True to compress out of core.

    Raises:
        ValueError: if ``out_of_core`` is neither a bool nor ``"auto"``.
    """
    if isinstance(out_of_core, bool):
        return out_of_core
    if out_of_core != "auto":
        raise ValueError(f"out_of_core: expected True, False or 'auto', got {out_of_core!r}")
    inherited = _inherited_choice(directory)
    if inherited is not None:
        logger.info(
            "out_of_core='auto': {} is {}, as the process that started this one chose",
            directory,
            "compressed one block in memory at a time" if inherited else "loaded in memory",
        )
        return inherited
    choice = _choose(directory, blockers)
    _leave_choice(directory, choice)
    return choice


def _choose(directory: str | Path, blockers: Sequence[str]) -> bool:
    """The ``"auto"`` choice, from figures every rank shares."""
    try:
        files = CheckpointFiles(directory)
    except (FileNotFoundError, ValueError) as error:
        files, unreadable = None, str(error)
    weights, available, processes = _agreed(
        None if files is None else files.nbytes, available_memory()
    )
    if weights is None:
        reason = unreadable if files is None else "another process cannot read its weights"
        logger.info("out_of_core='auto': {} is loaded in memory ({})", directory, reason)
        return False
    if "quantization_config" in files.config():
        blockers = [*blockers, "it is a compressed checkpoint (dequantized when loaded)"]
    whose = "" if processes == 1 else f", the least of {processes} processes"
    if available is None:
        logger.info(
            "out_of_core='auto': the available memory cannot be read{}; {} ({:.2f} GB of "
            "weights) is loaded in memory",
            "" if processes == 1 else " by every process",
            directory,
            weights / GB,
        )
        return False
    sizes = f"{weights / GB:.2f} GB of weights, {available / GB:.2f} GB of memory available{whose}"
    if weights <= MEMORY_SHARE * available:
        logger.info(
            "out_of_core='auto': {} is loaded in memory ({}; out of core above {:.0%} of it)",
            directory,
            sizes,
            MEMORY_SHARE,
        )
        return False
    if blockers:
        logger.warning(
            "out_of_core='auto': {} is loaded in memory although it may not fit ({}), "
            "since {}; compressing it one block at a time needs none of these",
            directory,
            sizes,
            " and ".join(blockers),
        )
        return False
    logger.info(
        "out_of_core='auto': {} is compressed one block in memory at a time, read from its "
        "files ({}, more than {:.0%}); out_of_core=False loads it",
        directory,
        sizes,
        MEMORY_SHARE,
    )
    return True


def _agreed(weights: int | None, available: int | None) -> tuple[int | None, int | None, int]:
    """The figures every rank chooses from: under ``torch.distributed``, the largest weights
    and the least available memory of all ranks (None where a rank has none).

    Args:
        weights: this rank's weights in bytes; None when it cannot read the checkpoint.
        available: this rank's available memory in bytes; None when it cannot be read.

    Returns:
        ``(weights, available, processes)``.
    """
    if not is_distributed():
        _warn_if_started_apart()
        return weights, available, 1
    mine = [-1 if weights is None else weights, -1 if available is None else available]
    low = all_reduce_min_(torch.tensor(mine, dtype=torch.long)).tolist()
    high = all_reduce_max_(torch.tensor(mine, dtype=torch.long)).tolist()
    return (
        None if low[0] < 0 else high[0],
        None if low[1] < 0 else low[1],
        rank_and_world_size()[1],
    )


def _warn_if_started_apart() -> None:
    processes = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if processes > 1:
        logger.warning(
            "out_of_core='auto': this process is one of {} that were started apart (torchrun, "
            "SLURM) and are not connected yet, so each chooses from its own memory; processes "
            "that choose differently are refused when the calibration starts. Pass "
            "out_of_core=True or False so that they agree",
            processes,
        )


def _key(directory: str | Path) -> str:
    return str(Path(directory).expanduser().resolve())


def _choices() -> dict[str, bool]:
    try:
        choices = json.loads(os.environ.get(CHOICES_VARIABLE, "{}"))
    except json.JSONDecodeError:
        return {}
    return choices if isinstance(choices, dict) else {}


def _inherited_choice(directory: str | Path) -> bool | None:
    """The choice of the process that started this one (a rank other than the first that
    Lightning's ``ddp`` started, not yet connected to the others), if it chose."""
    if is_distributed() or int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        return None
    choice = _choices().get(_key(directory))
    return choice if isinstance(choice, bool) else None


def _leave_choice(directory: str | Path, choice: bool) -> None:
    """Leaves ``choice`` in the environment, for the processes this one starts."""
    os.environ[CHOICES_VARIABLE] = json.dumps({**_choices(), _key(directory): choice})
