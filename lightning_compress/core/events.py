"""Lifecycle events: what happened (``EventType``) and when (``Event``)."""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass
from enum import Enum, unique

from loguru import logger

__all__ = ["Event", "EventType"]

# Tolerance used when comparing fractional epoch indices (e.g. 0.3 % 0.1).
_INDEX_TOLERANCE = 1e-9


@unique
class EventType(Enum):
    """The kinds of event a compression lifecycle reacts to.

    ``INITIALIZE`` and ``FINALIZE`` are raised by ``initialize()``/``finalize()`` only; the
    training events come once per batch (or optimizer step), the calibration events once per
    calibration epoch and ``SEQUENTIAL_EPOCH_END`` once per calibrated layer or subgraph.
    """

    INITIALIZE = "initialize"
    FINALIZE = "finalize"
    BATCH_START = "batch_start"
    LOSS_CALCULATED = "loss_calculated"
    BATCH_END = "batch_end"
    CALIBRATION_EPOCH_START = "calibration_epoch_start"
    SEQUENTIAL_EPOCH_END = "sequential_epoch_end"
    CALIBRATION_EPOCH_END = "calibration_epoch_end"
    OPTIM_PRE_STEP = "optim_pre_step"
    OPTIM_POST_STEP = "optim_post_step"


@dataclass
class Event:
    """An event together with the position in training at which it happens.

    Args:
        type_: the event type.
        steps_per_epoch: optimizer steps per epoch; when set the event is epoch based and
            schedules are expressed in (fractional) epochs.
        batches_per_step: batches per optimizer step (gradient accumulation).
        invocations_per_step: how many times ``optimizer.step`` runs per wrapped step.
        global_step: optimizer steps taken so far.
        global_batch: batches seen so far.
    """

    type_: EventType | None = None
    steps_per_epoch: int | None = None
    batches_per_step: int | None = None
    invocations_per_step: int = 1
    global_step: int = 0
    global_batch: int = 0

    @property
    def epoch_based(self) -> bool:
        """Whether the event knows the epoch length (``steps_per_epoch`` is set)."""
        return self.steps_per_epoch is not None

    def _require_epoch_based(self) -> int:
        if not self.epoch_based:
            raise ValueError(
                "Event is not epoch based: set steps_per_epoch to use epoch properties"
            )
        return self.steps_per_epoch

    @property
    def epoch(self) -> int:
        """The current (whole) epoch.

        Raises:
            ValueError: if the event is not epoch based.
        """
        return self.global_step // self._require_epoch_based()

    @property
    def epoch_full(self) -> float:
        """The current epoch including the fraction of it already done.

        Raises:
            ValueError: if the event is not epoch based.
        """
        return self.global_step / float(self._require_epoch_based())

    @property
    def epoch_step(self) -> int:
        """The optimizer step within the current epoch.

        Raises:
            ValueError: if the event is not epoch based.
        """
        return self.global_step % self._require_epoch_based()

    @property
    def epoch_batch(self) -> int:
        """The batch within the current epoch.

        Raises:
            ValueError: if the event is not epoch based.
        """
        steps_per_epoch = self._require_epoch_based()
        batches_per_epoch = steps_per_epoch * (self.batches_per_step or 1)
        return self.global_batch % batches_per_epoch

    @property
    def current_index(self) -> float:
        """The schedule index: ``epoch_full`` when epoch based, else ``global_step``.

        Raises:
            ValueError: if the epoch based index runs more than one epoch ahead of ``epoch``.
        """
        if not self.epoch_based:
            return self.global_step
        epoch_full = self.epoch_full
        if epoch_full - self.epoch > 1.0:
            raise ValueError("Too many steps per epoch for epoch based event")
        return epoch_full

    @current_index.setter
    def current_index(self, value: float) -> None:
        steps = value * self.steps_per_epoch if self.epoch_based else value
        self.global_step = int(round(steps)) if _is_whole(steps) else int(steps)
        batches_per_step = self.batches_per_step
        multiplier = batches_per_step if batches_per_step and batches_per_step > 1 else 1
        self.global_batch = self.global_step * multiplier

    def new_instance(self, **kwargs) -> Event:
        """Return a deep copy of this event with ``kwargs`` set on it.

        Args:
            **kwargs: attributes to set on the copy.

        Returns:
            The new event.
        """
        logger.trace("Creating new instance of event with kwargs: {}", kwargs)
        instance = deepcopy(self)
        for key, value in kwargs.items():
            setattr(instance, key, value)
        return instance

    def should_update(self, start: float | None, end: float | None, update: float | None) -> bool:
        """Whether a schedule ``start``/``end``/``update`` fires at this event.

        Indices compare with a small tolerance, so fractional epochs such as ``update=0.1``
        fire exactly where expected (plain float modulo misses ``0.3 % 0.1``).

        Args:
            start: first index at which to update; None ignores it.
            end: last index at which to update; None ignores it.
            update: update interval; None or 0 updates at every event.

        Returns:
            True if an update is due.
        """
        current = self.current_index
        logger.trace(
            "Checking if event should update: current_index={}, start={}, end={}, update={}",
            current,
            start,
            end,
            update,
        )
        if start is not None and current < start - _INDEX_TOLERANCE:
            return False
        if end is not None and current > end + _INDEX_TOLERANCE:
            return False
        if update is None or update <= 0.0:
            return True
        remainder = math.fmod(current, update)
        return remainder < _INDEX_TOLERANCE or update - remainder < _INDEX_TOLERANCE


def _is_whole(value: float) -> bool:
    return abs(value - round(value)) < _INDEX_TOLERANCE
