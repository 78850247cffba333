"""Metric loggers for compression sessions: loguru by default, pluggable for others."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loguru import logger

from lightning_compress.core.verbosity import shows_details

__all__ = ["BaseLogger", "LoggerManager", "LoguruLogger"]


class BaseLogger:
    """A destination for metrics; subclass it and override ``log_scalar`` (and others).

    Args:
        name: a name for the logger, used in messages.
        enabled: False to drop everything logged to it.
    """

    def __init__(self, name: str, enabled: bool = True) -> None:
        self.name = name
        self.enabled = enabled

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Log hyperparameters (the recipe's fields, for example).

        Args:
            params: names and values.
        """

    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        """Log one scalar.

        Args:
            tag: the metric's name.
            value: its value.
            step: the step or epoch index it belongs to.
        """

    def log_scalars(self, tag: str, values: dict[str, float], step: float | None = None) -> None:
        """Log several scalars as ``{tag}/{key}``.

        Args:
            tag: prefix for the metrics' names.
            values: names and values.
            step: the step or epoch index they belong to.
        """
        for key, value in values.items():
            self.log_scalar(f"{tag}/{key}", value, step)

    def log_string(self, tag: str, string: str, step: float | None = None) -> None:
        """Log a line of text.

        Args:
            tag: what the text is about.
            string: the text.
            step: the step or epoch index it belongs to.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, enabled={self.enabled})"


class LoguruLogger(BaseLogger):
    """Writes metrics to loguru at ``level`` (DEBUG by default).

    Metrics below INFO are per-layer detail: they are written only at the ``debug``
    verbosity (``lightning_compress.set_verbosity("debug")``), so that loguru's default
    sink, which shows DEBUG, does not print one line per layer.

    Args:
        name: a name for the logger.
        level: the loguru level to log at.
        enabled: False to drop everything.
    """

    def __init__(self, name: str = "loguru", level: str = "DEBUG", enabled: bool = True) -> None:
        super().__init__(name, enabled)
        self.level = level

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        self._log("hyperparams: {}", params)

    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        self._log("{} = {} (step {})", tag, _as_float(value), step)

    def log_string(self, tag: str, string: str, step: float | None = None) -> None:
        self._log("{}: {} (step {})", tag, string, step)

    def _log(self, message: str, *args: Any) -> None:
        if logger.level(self.level).no < _INFO and not shows_details():
            return
        logger.opt(depth=1).log(self.level, message, *args)


class LoggerManager:
    """Fans metrics out to several loggers and decides when model info is due.

    Args:
        loggers: the loggers to write to.
        log_frequency: how often (in schedule index units: epochs when epoch based, else
            steps) model information is logged; None never logs it.
        log_python: add a ``LoguruLogger`` as well.
        name: a name for the manager.
    """

    def __init__(
        self,
        loggers: Iterable[BaseLogger] | None = None,
        log_frequency: float | None = 0.1,
        log_python: bool = True,
        name: str = "manager",
    ) -> None:
        self.name = name
        self.log_frequency = log_frequency
        self._loggers: list[BaseLogger] = []
        for item in loggers or []:
            self.add_logger(item)
        if log_python and not any(isinstance(item, LoguruLogger) for item in self._loggers):
            self._loggers.append(LoguruLogger())
        self.last_log_step: float | None = None

    @property
    def loggers(self) -> list[BaseLogger]:
        """The loggers written to."""
        return list(self._loggers)

    @property
    def metric(self) -> LoggerManager:
        """The manager itself, for code written as ``loggers.metric.log_scalars(...)``."""
        return self

    def add_logger(self, item: BaseLogger) -> None:
        """Add a logger.

        Args:
            item: the logger.

        Raises:
            TypeError: if ``item`` is not a ``BaseLogger``.
        """
        if not isinstance(item, BaseLogger):
            raise TypeError(f"loggers: expected BaseLogger instances, got {type(item).__name__}")
        self._loggers.append(item)

    def log_ready(
        self,
        current_log_step: float | None,
        last_log_step: float | None,
        cadence: float | None = None,
    ) -> bool:
        """Whether model information is due at ``current_log_step``.

        Args:
            current_log_step: the current schedule index.
            last_log_step: the index of the last model log, None if never logged.
            cadence: overrides ``log_frequency`` when given.

        Returns:
            True when logging is due.
        """
        frequency = self.log_frequency if cadence is None else cadence
        if frequency is None or current_log_step is None:
            return False
        if last_log_step is None:
            return True
        return current_log_step - last_log_step >= frequency - 1e-9

    def log_written(self, step: float) -> None:
        """Record that model information was logged at ``step``.

        Args:
            step: the schedule index.
        """
        self.last_log_step = step

    def _enabled(self) -> list[BaseLogger]:
        return [item for item in self._loggers if item.enabled]

    def log_hyperparams(self, params: dict[str, Any]) -> None:
        """Log hyperparameters to every enabled logger."""
        for item in self._enabled():
            item.log_hyperparams(params)

    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        """Log a scalar to every enabled logger."""
        for item in self._enabled():
            item.log_scalar(tag, _as_float(value), step)

    def log_scalars(self, tag: str, values: dict[str, float], step: float | None = None) -> None:
        """Log several scalars to every enabled logger."""
        floats = {key: _as_float(value) for key, value in values.items()}
        for item in self._enabled():
            item.log_scalars(tag, floats, step)

    def log_string(self, tag: str, string: str, step: float | None = None) -> None:
        """Log text to every enabled logger."""
        for item in self._enabled():
            item.log_string(tag, string, step)


_INFO = logger.level("INFO").no


def _as_float(value: Any) -> float:
    return float(value.item()) if hasattr(value, "item") else float(value)
