"""The QAT benchmark's training starts where its one-shot run ended and stays on the grid.

Run on one decoder block with SmolLM2-135M's widths (random weights, 64-token vocabulary), a
few steps each: the script's own functions, as ``benchmarks/qat_smollm2.py`` calls them.
"""

from __future__ import annotations

import argparse

import pytest
import torch

STEPS = 2


@pytest.fixture
def script(benchmark_script):
    """``benchmarks/qat_smollm2.py``, imported as the script runs."""
    return benchmark_script("qat_smollm2")


@pytest.fixture
def tiny_llama(random_llama):
    """One decoder block with SmolLM2-135M's layer widths, random weights."""
    return random_llama(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
    )


def _args() -> argparse.Namespace:
    return argparse.Namespace(batch=2, seed=0, log_every=1)


def _windows(count: int, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 64, (count, length), generator=torch.Generator().manual_seed(1))


def _codes(layer: dict[str, torch.Tensor]) -> torch.Tensor:
    """A W4 g64 layer's weight divided by its group scales."""
    weight, scale = layer["weight"], layer["weight_scale"]
    return weight.unflatten(1, (scale.shape[1], -1)) / scale.unsqueeze(-1)


def test_training_from_gptq_keeps_gptqs_scales_and_grid(script, tiny_llama):
    script.one_shot(tiny_llama, "w4a16_g64", "gptq", _windows(4))
    start = script.quantized_state(tiny_llama)
    fresh = type(tiny_llama)(tiny_llama.config)
    fresh.load_state_dict(tiny_llama.state_dict(), strict=False)
    # the check at the first batch (training starts exactly at GPTQ's weights) runs inside
    script.train(fresh, "w4a16_g64", _windows(8), _args(), lr=1e-3, steps=STEPS, start_from=start)

    trained = script.quantized_state(fresh)
    assert trained.keys() == start.keys()
    moved = 0
    for name, layer in trained.items():
        torch.testing.assert_close(
            layer["weight_scale"], start[name]["weight_scale"], rtol=0, atol=0
        )
        codes = _codes(layer)
        rounded = codes.round()
        torch.testing.assert_close(codes, rounded, rtol=0, atol=1e-4)
        assert rounded.min() >= -8 and rounded.max() <= 7, name
        moved += int((layer["weight"] != start[name]["weight"]).sum())
    assert moved > 0  # training changed codes, within the grid


def test_training_from_rtn_starts_at_rtns_weights(script, tiny_llama):
    rtn = type(tiny_llama)(tiny_llama.config)
    rtn.load_state_dict(tiny_llama.state_dict())
    script.one_shot(rtn, "w4a16_g64", "rtn", None)
    script.train(tiny_llama, "w4a16_g64", _windows(8), _args(), lr=0.0, steps=STEPS)

    for name, layer in script.quantized_state(rtn).items():
        torch.testing.assert_close(
            tiny_llama.get_submodule(name).weight, layer["weight"], rtol=0, atol=0
        )
