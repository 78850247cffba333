"""The thread-local active session and callbacks that act on it."""

from __future__ import annotations

import threading
from collections.abc import Generator
from contextlib import contextmanager
from typing import Any

from lightning_compress.core.events import EventType
from lightning_compress.core.session import CompressionSession
from lightning_compress.core.state import ModifiedState

__all__ = ["LifecycleCallbacks", "active_session", "create_session", "reset_session"]

_global_session = CompressionSession()
_local_storage = threading.local()


def active_session() -> CompressionSession:
    """The active session: this thread's, else the process-wide default.

    Returns:
        The active session.
    """
    return getattr(_local_storage, "session", None) or _global_session


@contextmanager
def create_session() -> Generator[CompressionSession, None, None]:
    """Make a new session active in this thread for the duration of the context.

    Returns:
        A context manager yielding the new session; the previous one is restored on exit.
    """
    previous = getattr(_local_storage, "session", None)
    new_session = CompressionSession()
    _local_storage.session = new_session
    try:
        yield new_session
    finally:
        _local_storage.session = previous


def reset_session() -> None:
    """Reset the active session to its initial state."""
    active_session().reset()


class LifecycleCallbacks:
    """Invoke lifecycle events on the active session."""

    @classmethod
    def event(cls, event_type: EventType, **kwargs) -> ModifiedState:
        """Invoke ``event_type`` on the active session.

        Args:
            event_type: the event; INITIALIZE and FINALIZE are refused.
            **kwargs: passed to the session's ``event``.

        Returns:
            The active session's state after the event.

        Raises:
            ValueError: for INITIALIZE or FINALIZE.
        """
        if event_type in (EventType.INITIALIZE, EventType.FINALIZE):
            raise ValueError(
                f"Cannot invoke {event_type} event. Use the corresponding method instead "
                f"(initialize() or finalize())."
            )
        return active_session().event(event_type, **kwargs)

    @classmethod
    def batch_start(cls, batch_data: Any | None = None, **kwargs) -> ModifiedState:
        """Invoke BATCH_START with the batch."""
        return cls.event(EventType.BATCH_START, batch_data=batch_data, **kwargs)

    @classmethod
    def loss_calculated(cls, loss: Any | None = None, **kwargs) -> ModifiedState:
        """Log the loss and invoke LOSS_CALCULATED with it."""
        active_session()._log_loss(event_type=EventType.LOSS_CALCULATED, loss=loss)
        return cls.event(EventType.LOSS_CALCULATED, loss=loss, **kwargs)

    @classmethod
    def optim_pre_step(cls, **kwargs) -> ModifiedState:
        """Invoke OPTIM_PRE_STEP."""
        return cls.event(EventType.OPTIM_PRE_STEP, **kwargs)

    @classmethod
    def optim_post_step(cls, **kwargs) -> ModifiedState:
        """Invoke OPTIM_POST_STEP."""
        return cls.event(EventType.OPTIM_POST_STEP, **kwargs)

    @classmethod
    def batch_end(cls, **kwargs) -> ModifiedState:
        """Log model information when due and invoke BATCH_END."""
        active_session()._log_model_info()
        return cls.event(EventType.BATCH_END, **kwargs)

    @classmethod
    def calibration_epoch_start(cls, **kwargs) -> ModifiedState:
        """Invoke CALIBRATION_EPOCH_START, before calibration data is fed."""
        return cls.event(EventType.CALIBRATION_EPOCH_START, **kwargs)

    @classmethod
    def sequential_epoch_end(cls, subgraph: Any, **kwargs) -> ModifiedState:
        """Invoke SEQUENTIAL_EPOCH_END after one layer or subgraph has been calibrated.

        Args:
            subgraph: the calibrated layer or subgraph.
            **kwargs: passed to the session's ``event``.
        """
        return cls.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=subgraph, **kwargs)

    @classmethod
    def calibration_epoch_end(cls, **kwargs) -> ModifiedState:
        """Invoke CALIBRATION_EPOCH_END, after all calibration data was fed."""
        return cls.event(EventType.CALIBRATION_EPOCH_END, **kwargs)
