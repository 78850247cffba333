"""Two CPU processes (ddp_fork, gloo): SmoothQuant and AWQ smooth like one process."""

from __future__ import annotations

import pytest
import torch
from calibration_runs import calibrate_tiny_decoder

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.modifiers.smoothing import AWQModifier, SmoothQuantModifier

pytestmark = pytest.mark.distributed

CONFIG = TinyDecoderConfig(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4, vocab_size=64
)


def recipe() -> list:
    """SmoothQuant, then AWQ on the smoothed model: max and mean statistics, Hessians, probes."""
    weights = {"num_bits": 4, "strategy": "group", "group_size": 32}
    return [
        SmoothQuantModifier(smoothing_strength=0.5, ignore=["lm_head"]),
        AWQModifier(weights=weights, ignore=["lm_head"]),
    ]


def test_two_ranks_smooth_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate_tiny_decoder(single, recipe(), CONFIG, devices=1)
    calibrate_tiny_decoder(ddp, recipe(), CONFIG, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    torch.manual_seed(0)
    original = TinyDecoder(CONFIG).state_dict()
    changed = [name for name, tensor in expected.items() if not torch.equal(tensor, original[name])]
    assert "model.layers.1.self_attn.o_proj.weight" in changed  # v_proj -> o_proj was smoothed
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6, msg=name)
