"""Two CPU processes (ddp_fork, gloo): GPTQ of a mixture's experts equals one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from calibration_runs import run_calibration
from moe_models import routed_experts, tiny_moe, tokens

from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers import GPTQModifier

pytestmark = pytest.mark.distributed

GROUP = {"num_bits": 4, "strategy": "group", "group_size": 16}


def calibrate(directory: Path, everything: bool, **trainer_kwargs) -> None:
    recipe = GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": GROUP}},
        ignore=["lm_head", "re:.*mlp.gate$"],
    )
    module = CalibrationModule(tiny_moe("qwen3_moe"), recipe, moe_calibrate_all_experts=everything)
    run_calibration(directory, module, tokens(8, 16), **trainer_kwargs)


@pytest.mark.parametrize("everything", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_ranks_quantize_experts_like_one_process(tmp_path, everything):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate(single, everything, devices=1)
    calibrate(ddp, everything, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    assert "model.layers.1.mlp.experts.3.down_proj.weight_scale" in expected
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name


def test_ranks_routing_their_first_batches_unlike_use_the_first_ranks_stages(tmp_path):
    """Routed calibration: rank 1's first batch (one token repeated) reaches fewer experts
    than rank 0's, so their probes find different stages; every rank takes rank 0's, which
    are one process's (its first batch is rank 0's), and ends with one process's weights."""
    data = torch.cat([tokens(1, 16, 0), torch.full((1, 16), 5), tokens(2, 16, 2)])
    first, second = routed_experts(tiny_moe("qwen3_moe"), [data[:1], data[1:2]])
    assert first == [set(range(4))] * 2 and len(second[0]) < 4
    recipe = GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": GROUP}},
        ignore=["lm_head", "re:.*mlp.gate$"],
    )
    for devices, strategy in ((1, "auto"), (2, "ddp_fork")):
        (tmp_path / str(devices)).mkdir()
        module = CalibrationModule(tiny_moe("qwen3_moe"), recipe, moe_calibrate_all_experts=False)
        run_calibration(tmp_path / str(devices), module, data, devices=devices, strategy=strategy)
    expected = torch.load(tmp_path / "1" / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        state = torch.load(tmp_path / "2" / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name
