"""Two CPU processes (ddp_fork, gloo): SmoothQuant and AWQ smooth a mixture of experts like one
process, though each rank routes its own tokens to other experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from calibration_runs import run_calibration
from moe_models import tiny_moe, tokens

from lightning_compress.layers import linearize
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers.smoothing import AWQModifier, SmoothQuantModifier

pytestmark = pytest.mark.distributed

IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]


def calibrate(directory: Path, everything: bool, **trainer_kwargs) -> None:
    recipe = [
        SmoothQuantModifier(smoothing_strength=0.5, ignore=IGNORE),
        AWQModifier(weights={"num_bits": 4, "strategy": "group", "group_size": 8}, ignore=IGNORE),
    ]
    module = CalibrationModule(tiny_moe("qwen2_moe"), recipe, moe_calibrate_all_experts=everything)
    run_calibration(directory, module, tokens(8, 16), **trainer_kwargs)


@pytest.mark.parametrize("everything", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_two_ranks_smooth_experts_like_one_process(tmp_path, everything):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate(single, everything, devices=1)
    calibrate(ddp, everything, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    original = tiny_moe("qwen2_moe")
    linearize(original)
    original = original.state_dict()
    # the experts' own mapping and the router were smoothed
    for name in ("mlp.experts.3.down_proj.weight", "mlp.gate.weight"):
        key = f"model.layers.1.{name}"
        assert not torch.equal(expected[key], original[key]), key
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
