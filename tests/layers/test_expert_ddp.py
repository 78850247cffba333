"""Two CPU processes (ddp_fork, gloo): GPTQ of a mixture's experts equals one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from calibration_runs import run_calibration
from moe_models import tiny_moe, tokens

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
