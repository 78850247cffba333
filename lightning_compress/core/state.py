"""What a compression session knows: model, optimizer, data, hardware, loggers."""

from __future__ import annotations

from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from lightning_compress.core.logger import BaseLogger, LoggerManager

__all__ = ["Data", "Hardware", "ModifiedState", "State"]


@dataclass
class Data:
    """The data sets a session may use.

    Args:
        train: training data.
        val: validation data.
        test: test data.
        calib: calibration data.
    """

    train: Any | None = None
    val: Any | None = None
    test: Any | None = None
    calib: Any | None = None


@dataclass
class Hardware:
    """Where the session runs.

    Args:
        device: the current device.
        devices: all devices in use.
        rank: this process's global rank.
        world_size: number of processes.
        local_rank: this process's rank on its machine.
        local_world_size: number of processes on this machine.
        distributed: whether training is distributed.
        distributed_strategy: the strategy's name.
    """

    device: str | None = None
    devices: list[str] | None = None
    rank: int | None = None
    world_size: int | None = None
    local_rank: int | None = None
    local_world_size: int | None = None
    distributed: bool | None = None
    distributed_strategy: str | None = None


@dataclass
class State:
    """The current state of compression.

    Args:
        model: the model being compressed.
        teacher_model: the teacher for distillation.
        optimizer: the training optimizer.
        optim_wrapped: whether optimizer callbacks are attached.
        loss: the latest loss.
        batch_data: the current batch.
        data: the data sets.
        hardware: where the session runs.
        loggers: where metrics go.
        model_log_cadence: how often model info is logged, in epochs (or steps).
        start: the index the run starts from (e.g. a resumed epoch).
        steps_per_epoch: optimizer steps per epoch, when known.
        batches_per_step: batches per optimizer step, when known.
    """

    model: Any = None
    teacher_model: Any = None
    optimizer: Any = None
    optim_wrapped: bool | None = None
    loss: Any = None
    batch_data: Any = None
    data: Data = field(default_factory=Data)
    hardware: Hardware = field(default_factory=Hardware)
    loggers: LoggerManager | None = None
    model_log_cadence: float | None = None
    _last_log_step: float | int | None = None
    start: float | None = None
    steps_per_epoch: int | None = None
    batches_per_step: int | None = None

    @property
    def compression_ready(self) -> bool:
        """True when both the model and the optimizer are set."""
        return self.model is not None and self.optimizer is not None

    def update(
        self,
        model: Any = None,
        teacher_model: Any = None,
        optimizer: Any = None,
        attach_optim_callbacks: bool = True,
        train_data: Any = None,
        val_data: Any = None,
        test_data: Any = None,
        calib_data: Any = None,
        copy_data: bool = True,
        start: float | None = None,
        steps_per_epoch: int | None = None,
        batches_per_step: int | None = None,
        loggers: LoggerManager | list[BaseLogger] | None = None,
        model_log_cadence: float | None = None,
        **kwargs,
    ) -> dict:
        """Update the state with every argument that is not None.

        Args:
            model: the model.
            teacher_model: the teacher model.
            optimizer: the optimizer.
            attach_optim_callbacks: stored as ``optim_wrapped`` when an optimizer is given.
            train_data: training data.
            val_data: validation data.
            test_data: test data.
            calib_data: calibration data.
            copy_data: deep copy the data sets instead of keeping references.
            start: the index the run starts from.
            steps_per_epoch: optimizer steps per epoch.
            batches_per_step: batches per optimizer step.
            loggers: a ``LoggerManager`` or a list of ``BaseLogger``; None keeps the current
                loggers (a loguru logger when there are none yet).
            model_log_cadence: how often model info is logged.
            **kwargs: other values; ``device`` sets ``hardware.device``.

        Returns:
            The unused ``kwargs``.
        """
        logger.trace(
            "Updating state: model={}, optimizer={}, steps_per_epoch={}, batches_per_step={}",
            type(model).__name__ if model is not None else None,
            type(optimizer).__name__ if optimizer is not None else None,
            steps_per_epoch,
            batches_per_step,
        )
        if model is not None:
            self.model = model
        if teacher_model is not None:
            self.teacher_model = teacher_model
        if optimizer is not None:
            self.optim_wrapped = attach_optim_callbacks
            self.optimizer = optimizer
        for name, value in (
            ("train", train_data),
            ("val", val_data),
            ("test", test_data),
            ("calib", calib_data),
        ):
            if value is not None:
                setattr(self.data, name, deepcopy(value) if copy_data else value)
        if start is not None:
            self.start = start
        if steps_per_epoch is not None:
            self.steps_per_epoch = steps_per_epoch
        if batches_per_step is not None:
            self.batches_per_step = batches_per_step
        if "device" in kwargs:
            self.hardware.device = kwargs["device"]
        if isinstance(loggers, list):
            loggers = LoggerManager(loggers)
        if loggers is not None:
            self.loggers = loggers
        elif self.loggers is None:
            self.loggers = LoggerManager()
        if model_log_cadence is not None:
            self.model_log_cadence = model_log_cadence
        return kwargs


class ModifiedState:
    """The model, optimizer and loss after an event, with what the modifiers returned.

    Args:
        model: the modified model.
        optimizer: the modified optimizer.
        loss: the modified loss.
        modifier_data: the values returned by the modifiers.
    """

    def __init__(self, model: Any, optimizer: Any, loss: Any, modifier_data: Any) -> None:
        self.model = model
        self.optimizer = optimizer
        self.loss = loss
        self.modifier_data = modifier_data

    def __repr__(self) -> str:
        return (
            f"ModifiedState(model={type(self.model).__name__}, "
            f"optimizer={type(self.optimizer).__name__}, loss={self.loss!r}, "
            f"modifier_data={self.modifier_data!r})"
        )
