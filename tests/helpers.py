"""Test helpers: a recording modifier, a tiny model, a quiet CPU Trainer and a crash callback."""

from __future__ import annotations

import os
import signal
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_compress.core import Event, State
from lightning_compress.modifiers import Modifier


class RecordingModifier(Modifier):
    """Records every callback with the event's position, for lifecycle tests."""

    targets: str | list[str] = "Linear"
    start: float | None = 0.0
    fail_on: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.calls: list[tuple[str, Any, int | None, float | None]] = []
        self.forward_calls = 0

    def _record(self, name: str, event: Event | None) -> None:
        if self.fail_on == name:
            raise RuntimeError(f"injected failure in {name}")
        if event is None:
            self.calls.append((name, None, None, None))
        else:
            self.calls.append((name, event.type_, event.global_step, event.current_index))

    def on_initialize(self, state: State, **kwargs: Any) -> Any:
        self.layers = self.resolve_targets(state.model)
        for layer in self.layers.values():
            self.register_hook(layer, self._count_forward, "forward")
        self._record("initialize", None)
        return {"initialized": type(self).__name__}

    def _count_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self.forward_calls += 1

    def on_start(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self._record("start", event)

    def on_update(self, state: State, event: Event, **kwargs: Any) -> None:
        self._record("update", event)

    def on_end(self, state: State, event: Event | None, **kwargs: Any) -> None:
        self._record("end", event)

    def on_event(self, state: State, event: Event, **kwargs: Any) -> Any:
        self._record("event", event)
        return kwargs.get("loss")

    def on_finalize(self, state: State, **kwargs: Any) -> Any:
        self._record("finalize", None)
        return "finalized"

    def names(self, kind: str | None = None) -> list[Any]:
        """The recorded calls, optionally only those named ``kind``."""
        return [call for call in self.calls if kind is None or call[0] == kind]


class TwoLayer(nn.Module):
    """A tiny MLP with named linears, for target resolution and session tests."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def int8_channel_groups(targets: str | list[str] = "Linear") -> dict[str, dict[str, Any]]:
    """``config_groups`` of symmetric int8 per-channel weights on ``targets``.

    The ``W8A16`` preset stores int8 weights in groups of 128 (as compressed-tensors defines
    it), which tiny models 64 wide cannot hold; tests that only need some weight
    quantization use these per-channel weights instead.

    Args:
        targets: the layers the group quantizes.

    Returns:
        A fresh ``config_groups`` dict with one group.
    """
    return {
        "group_0": {
            "targets": [targets] if isinstance(targets, str) else list(targets),
            "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"},
        }
    }


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A quiet CPU Trainer."""
    settings = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    settings.update(kwargs)
    return Trainer(**settings)


class KillAfter(Callback):
    """Kills the process (no clean-up, like a crash) once ``step`` optimizer steps are saved."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
