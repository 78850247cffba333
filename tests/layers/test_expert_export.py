"""Compressed MoE checkpoints: per-expert keys transformers fuses, reloaded with equal logits."""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from moe_models import tiny_moe, tokens
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier

GROUP = {"num_bits": 4, "strategy": "group", "group_size": 16}
EXPERT_KEYS = {
    "mixtral": "model.layers.1.block_sparse_moe.experts.3.{}",
    "qwen3_moe": "model.layers.1.mlp.experts.3.{}",
    "qwen2_moe": "model.layers.1.mlp.experts.3.{}",
    "olmoe": "model.layers.1.mlp.experts.3.{}",
    "deepseek_v3": "model.layers.1.mlp.experts.3.{}",
}
PROJECTIONS = {"mixtral": ("w1", "w3", "w2")}


def compressed(kind: str) -> torch.nn.Module:
    model = tiny_moe(kind)
    recipe = QuantizationModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": GROUP}},
        ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$", "re:.*router.*"],
    )
    oneshot(model, recipe, progress=False)
    return model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens(2, 10, seed=5)).logits


def check_reload(kind: str, tmp_path) -> None:
    model = compressed(kind)
    path = save_compressed(model, tmp_path / kind, progress=False)
    stored = load_file(path / "model.safetensors")
    for projection in PROJECTIONS.get(kind, ("gate_proj", "up_proj", "down_proj")):
        key = EXPERT_KEYS[kind].format(projection)
        assert {f"{key}.weight_packed", f"{key}.weight_scale", f"{key}.weight_shape"} <= set(stored)
    assert not any(".experts.gate_up_proj" in key for key in stored)

    reloaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_compressed(path)), logits(model), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_transformers_reloads_the_per_expert_checkpoint_with_equal_logits(kind, tmp_path):
    check_reload(kind, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["qwen2_moe", "olmoe", "deepseek_v3"])
def test_transformers_reloads_more_moe_families(kind, tmp_path):
    check_reload(kind, tmp_path)


@pytest.mark.parametrize("kind", ["gpt_oss", "granitemoe"])
def test_a_fused_only_checkpoint_layout_is_named_in_a_warning_and_reloads_here(kind, tmp_path):
    model = compressed(kind)
    messages = []
    sink = logger.add(messages.append, level="WARNING", format="{message}")
    try:
        path = save_compressed(model, tmp_path / kind, progress=False)
    finally:
        logger.remove(sink)
    assert any("reads no per-expert keys" in message for message in messages)
    stored = load_file(path / "model.safetensors")
    assert any(".experts.3.down_proj.weight_packed" in key for key in stored)
    torch.testing.assert_close(logits(load_compressed(path)), logits(model), rtol=1e-5, atol=1e-6)
