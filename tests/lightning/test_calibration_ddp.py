"""Two CPU processes (ddp_fork, gloo) calibrate to exactly the single-process weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from calibration_runs import calibrate_tiny_decoder
from helpers import int8_channel_groups
from torch import nn

from lightning_compress.bundled import TinyDecoderConfig
from lightning_compress.core import Event, EventType, State
from lightning_compress.core.distributed import (
    all_reduce_max_,
    all_reduce_min_,
    all_reduce_sum_,
    broadcast_,
)
from lightning_compress.modifiers import Modifier, QuantizationModifier
from lightning_compress.pipelines import find_blocks

pytestmark = pytest.mark.distributed


class InputStatistics(Modifier):
    """Per block: the mean, min and max input feature over every rank's tokens.

    They are reduced across ranks at the block's SEQUENTIAL_EPOCH_END and stored as buffers;
    the mean also shifts the block's input norm, so later blocks' statistics depend on it.
    """

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.stats: dict[int, list[torch.Tensor]] = {}
        for _, block in find_blocks(state.model):
            self.register_hook(block, self._observe, "forward_pre")

    def _observe(self, block: nn.Module, args: tuple) -> None:
        hidden = args[0].detach().double().flatten(0, -2)
        if id(block) not in self.stats:
            width = hidden.shape[-1]
            inf = torch.full((width,), float("inf"), dtype=torch.double)
            self.stats[id(block)] = [
                torch.zeros(width, dtype=torch.double),
                torch.zeros(1),
                inf,
                -inf,
            ]
        total, count, low, high = self.stats[id(block)]
        total += hidden.sum(0)
        count += len(hidden)
        torch.minimum(low, hidden.min(0).values, out=low)
        torch.maximum(high, hidden.max(0).values, out=high)

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ != EventType.SEQUENTIAL_EPOCH_END:
            return
        block = kwargs["subgraph"]
        total, count, low, high = self.stats.pop(id(block))
        all_reduce_sum_(total)
        all_reduce_sum_(count)
        all_reduce_min_(low)
        all_reduce_max_(high)
        mean = (total / count).float()
        self.add_buffer(block, "input_mean", mean)
        self.add_buffer(block, "input_min", low.float())
        self.add_buffer(block, "input_max", high.float())
        self.add_buffer(block, "chosen_by", broadcast_(torch.tensor([state.hardware.rank]), src=0))
        with torch.no_grad():
            block.input_layernorm.weight.add_(0.1 * mean)


def calibrate(directory: Path, **trainer_kwargs: Any) -> None:
    config = TinyDecoderConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4)
    calibrate_tiny_decoder(
        directory,
        [
            QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
            InputStatistics(),
        ],
        config,
        **trainer_kwargs,
    )


def test_two_ranks_compress_exactly_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate(single, devices=1)  # on one thread, as each DDP worker (tests/conftest.py)
    calibrate(ddp, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    assert {"model.layers.2.input_mean", "model.layers.0.self_attn.q_proj.weight_scale"} <= set(
        expected
    )
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), (rank, name)
