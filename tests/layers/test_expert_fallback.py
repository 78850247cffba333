"""Routed-only calibration: an expert the router never picks falls back, named, never NaN."""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from moe_models import tiny_moe, tokens

from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier
from lightning_compress.modifiers.pruning import SparseGPTModifier

GROUP = {"num_bits": 4, "strategy": "group", "group_size": 16}
RECIPES = {
    "gptq": lambda: GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": GROUP}},
        ignore=["lm_head", "re:.*mlp.gate$"],
    ),
    "sparsegpt": lambda: SparseGPTModifier(
        sparsity=0.5, targets=["Linear"], ignore=["lm_head", "re:.*mlp.gate$"]
    ),
}


def never_routed_to_expert_3(model: torch.nn.Module) -> None:
    """Top-1 routing where expert 3's logit is the mean of experts 0 and 1: never the top."""
    with torch.no_grad():
        for layer in model.model.layers:
            router = layer.mlp.gate
            router.top_k = 1
            router.weight[3] = (router.weight[0] + router.weight[1]) / 2


def calibrate(kind: str, everything: bool) -> tuple[torch.nn.Module, list[str]]:
    model = tiny_moe("qwen3_moe")
    never_routed_to_expert_3(model)
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        oneshot(
            model,
            RECIPES[kind](),
            tokens(6, 16),
            num_calibration_samples=6,
            moe_calibrate_all_experts=everything,
            trainer_kwargs={"enable_progress_bar": False, "logger": False},
            progress=False,
        )
    finally:
        logger.remove(sink)
    return model, messages


@pytest.mark.parametrize("kind", ["gptq", "sparsegpt"])
def test_an_expert_without_tokens_falls_back_named_in_a_warning(kind):
    model, messages = calibrate(kind, everything=False)
    starved = [m for m in messages if "model.layers.0.mlp.experts.3.down_proj" in m]
    assert starved, messages
    assert "model.layers.0.mlp.experts.2.down_proj" not in starved[0]
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    layer = model.get_submodule("model.layers.0.mlp.experts.3.down_proj")
    if kind == "gptq":
        assert hasattr(layer, "weight_scale")
    else:
        assert float((layer.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05)


def test_calibrating_every_expert_needs_no_fallback():
    _, messages = calibrate("gptq", everything=True)
    assert not any("experts.3" in message for message in messages), messages
