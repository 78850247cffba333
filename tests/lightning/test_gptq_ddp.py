"""Two CPU processes (ddp_spawn, gloo): GPTQ and static-activation RTN equal one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from calibration_runs import calibrate_tiny_decoder

from lightning_compress.bundled import TinyDecoderConfig
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

pytestmark = pytest.mark.distributed

W4_G32 = {"num_bits": 4, "strategy": "group", "group_size": 32}
INT8_STATIC_ASYMMETRIC = {"num_bits": 8, "symmetric": False}
FP8 = {"type": "float", "num_bits": 8}


def recipe() -> list:
    """GPTQ on q/k/v and gate/up (shared Hessians); RTN with static FP8 and int8 inputs."""
    gptq = GPTQModifier(
        config_groups={"w4": {"targets": [r"re:.*(q|k|v|gate|up)_proj$"], "weights": W4_G32}},
        actorder="group",
    )
    rtn = QuantizationModifier(
        config_groups={
            "fp8": {"targets": [r"re:.*o_proj$"], "weights": FP8, "input_activations": FP8},
            "int8": {
                "targets": [r"re:.*down_proj$"],
                "weights": {"num_bits": 8, "strategy": "channel"},
                "input_activations": INT8_STATIC_ASYMMETRIC,
            },
        }
    )
    return [gptq, rtn]


def calibrate(directory: Path, **trainer_kwargs: Any) -> None:
    config = TinyDecoderConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=64
    )
    calibrate_tiny_decoder(directory, recipe(), config, **trainer_kwargs)


def test_two_ranks_quantize_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate(single, devices=1)  # on one thread, as each DDP worker (tests/conftest.py)
    calibrate(ddp, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    layer = "model.layers.1.{}.weight_g_idx"
    assert {layer.format("self_attn.q_proj"), layer.format("mlp.up_proj")} <= set(expected)
    assert {"model.layers.1.self_attn.o_proj.input_scale"} <= set(expected)
    assert expected["model.layers.1.mlp.down_proj.input_zero_point"].item() != 0
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            # float8 zero points compare as float32
            assert torch.allclose(tensor.float(), expected[name].float(), rtol=0, atol=1e-6), name
