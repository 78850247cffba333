"""Checkpoint directories written aside and published by rename, recovered after a crash.

A save writes into ``new/`` of a hidden work directory beside the target
(``.<name>.<random>.partial``), which holds a marker file naming the target. The saving
process keeps the marker locked (``flock``) until the work directory is gone, so a work
directory whose marker is unlocked belongs to a save that died. Publishing fsyncs every
file and directory of ``new/``, records that it is complete (``ready``), moves an existing
target into ``old/`` of the work directory, renames ``new/`` to the target and fsyncs the
parent directory. A crash between the two renames leaves the previous checkpoint in
``old/`` and the complete new one in ``new/``: the next save or load of the target finishes
the rename, so the target is never left without a checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from lightning_compress.export.writer import check_output_dir

__all__ = ["fsync_path", "recover_checkpoint", "staged_directory"]

WORK_SUFFIX = ".partial"
MARKER_NAME = "lightning-compress-staging.json"
MARKER_KIND = "lightning-compress staging directory"
NEW, OLD, READY = "new", "old", "ready"


@contextmanager
def staged_directory(output_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yields an empty directory that becomes ``output_dir`` when the block succeeds.

    Work directories that earlier, interrupted saves of ``output_dir`` left are finished
    or removed first (:func:`recover_checkpoint`). An error inside the block removes what
    was written, so ``output_dir`` is either the complete new checkpoint or as it was.

    Args:
        output_dir: the checkpoint directory.
        overwrite: replace an existing, non-empty ``output_dir``.

    Yields:
        The directory to write the checkpoint into.

    Raises:
        ExportError: as :func:`~lightning_compress.export.writer.check_output_dir`.
    """
    path = check_output_dir(output_dir, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_checkpoint(path)
    path = check_output_dir(path, overwrite)
    work, lock = _create_work_dir(path)
    try:
        try:
            yield work / NEW
            check_output_dir(path, overwrite)
            _publish(work, path)
        except BaseException:
            _settle(work, path, prefer_new=False)
            raise
        _settle(work, path, prefer_new=False)
    finally:
        os.close(lock)


def recover_checkpoint(output_dir: str | os.PathLike) -> None:
    """Finishes or removes what interrupted saves of ``output_dir`` left beside it.

    Only work directories of this module for this target whose saving process is gone (their
    marker is unlocked) are touched. When ``output_dir`` is missing because a save died
    between its two renames, the complete new checkpoint is moved into place (else the
    previous one is restored); then the work directory is removed. Each action is logged
    as a warning.

    Args:
        output_dir: the checkpoint directory.
    """
    path = Path(output_dir)
    if not path.parent.is_dir():
        return
    for work in _work_dirs(path):
        marker = work / MARKER_NAME
        lock = _try_lock(marker)
        if lock is None and marker.exists():
            continue  # its save is running
        try:
            if _marker_target(work) == path.name:
                _settle(work, path, prefer_new=True)
                logger.warning(
                    "removed {}, left by an interrupted save of {}", work.name, str(path)
                )
            elif _unstarted(work):
                _remove_work(work)
        finally:
            if lock is not None:
                os.close(lock)


def _create_work_dir(path: Path) -> tuple[Path, int]:
    """Creates the work directory of a save of ``path``; returns it and its marker's lock."""
    work = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{WORK_SUFFIX}"
    work.mkdir()
    lock = os.open(work / MARKER_NAME, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(lock, fcntl.LOCK_EX)
    os.write(lock, json.dumps({"kind": MARKER_KIND, "target": path.name}).encode())
    (work / NEW).mkdir()
    return work, lock


def _publish(work: Path, path: Path) -> None:
    """Makes ``work/new`` durable, then renames it to ``path`` (the old one into ``work``)."""
    _fsync_tree(work / NEW)
    (work / READY).touch()
    fsync_path(work)
    if path.exists():
        os.replace(path, work / OLD)
    os.replace(work / NEW, path)
    fsync_path(path.parent)


def _settle(work: Path, path: Path, prefer_new: bool) -> None:
    """Puts a checkpoint back at a missing ``path`` from ``work``, then removes ``work``.

    Args:
        work: a work directory of a save of ``path``.
        path: the checkpoint directory.
        prefer_new: take the complete new checkpoint (a save that died between its renames)
            rather than the previous one (a save that failed in this process).
    """
    if not work.is_dir():
        return
    if not path.exists():
        new, old = work / NEW, work / OLD
        complete = (work / READY).exists() and new.is_dir()
        source = new if complete and (prefer_new or not old.is_dir()) else old
        if source.is_dir():
            os.replace(source, path)
            fsync_path(path.parent)
            what = "the interrupted save's checkpoint" if source == new else "the previous one"
            logger.warning("{} was missing after an interrupted save: put {} back", path, what)
    _remove_work(work)


def _remove_work(work: Path) -> None:
    """Removes ``work``, its marker last: a crash meanwhile leaves it recognizable."""
    for entry in work.iterdir():
        if entry.name == MARKER_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    (work / MARKER_NAME).unlink(missing_ok=True)
    work.rmdir()


def _work_dirs(path: Path) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}{re.escape(WORK_SUFFIX)}")
    return [
        entry
        for entry in path.parent.iterdir()
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink()
    ]


def _try_lock(marker: Path) -> int | None:
    """Locks ``marker`` if no process holds it; None when it is missing or held."""
    try:
        lock = os.open(marker, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)
        return None
    return lock


def _marker_target(work: Path) -> str | None:
    try:
        marker = json.loads((work / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        return None
    return marker.get("target")


def _unstarted(work: Path) -> bool:
    """Whether ``work`` holds nothing but an empty marker: its save died creating it."""
    return all(entry.name == MARKER_NAME and entry.stat().st_size == 0 for entry in work.iterdir())


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(Path(directory))


def fsync_path(path: Path) -> None:
    """Flushes a file or directory to disk (a directory: its entries, such as a rename).

    Args:
        path: the file or directory.

    Raises:
        OSError: when it cannot be opened or flushed (e.g. ``ENOSPC`` on a full disk).
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
