"""FP8 blocks on layers their 128x128 blocks do not tile: padded as compressed-tensors pads them,
saved with block scales of ceil-divided shape, read back exactly and reloaded with equal logits."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from export_models import ARCHITECTURE, QUIET, tiny_model, token_ids
from moe_models import tiny_moe, tokens
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.layers.expert_names import expert_checkpoint_names
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

PROBE = torch.tensor([[3, 17, 60, 5, 44, 2, 37, 11, 8, 50]])
WIDE = {**ARCHITECTURE, "hidden_size": 128, "intermediate_size": 256}
"""Input features in whole blocks (the preset's activation groups of 128 need them); k/v
projections of 2 heads of 32: 64 rows, padded to a block."""


def check_read_back(model: nn.Module, path, fmt: str = "float-quantized") -> None:
    """Each stored layer: its weight unpadded, ceil(out/128) x ceil(in/128) scales, and
    compressed-tensors' decompression equal to the weight in memory."""
    stored = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == fmt
    (scheme,) = QuantizationConfig.model_validate(config).config_groups.values()
    compressor = BaseCompressor.get_value_from_registry(fmt)
    names = expert_checkpoint_names(model)
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]
    assert layers
    for name, module in layers:
        key = names.get(name, name)
        local = {"weight": stored[f"{key}.weight"], "weight_scale": stored[f"{key}.weight_scale"]}
        rows, columns = module.weight.shape
        assert local["weight"].shape == (rows, columns)
        assert local["weight_scale"].shape == (-(-rows // 128), -(-columns // 128))
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, module.weight.detach()), name


WEIGHT_ONLY = "naive-quantized"
"""What compressed-tensors stores fp8 weights without quantized activations in."""


def blocks_only() -> QuantizationModifier:
    """fp8 weights in 128x128 blocks, activations not quantized (no groups along the inputs)."""
    weights = {"type": "float", "strategy": "block", "block_structure": [128, 128]}
    group = {"targets": ["Linear"], "weights": weights}
    return QuantizationModifier(config_groups={"g": group}, ignore=["lm_head"])


def check_reload(model: nn.Module, path, probe: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(probe).logits
        reloaded = AutoModelForCausalLM.from_pretrained(path)
        torch.testing.assert_close(reloaded(probe).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(load_compressed(path)(probe).logits, expected)


@pytest.mark.parametrize("algorithm", ["RTN", "GPTQ"])
def test_fp8_block_preset_pads_rows_and_reloads_with_equal_logits(algorithm, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**WIDE)).eval()  # k/v: 64 rows, half a block
    modifier = GPTQModifier if algorithm == "GPTQ" else QuantizationModifier
    recipe = modifier(scheme="FP8_BLOCK", targets=["Linear"], ignore=["lm_head"])
    oneshot(model, recipe, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    path = save_compressed(model, tmp_path / "ckpt", progress=False)
    check_read_back(model, path)
    check_reload(model, path, PROBE)


def test_weight_blocks_pad_rows_and_columns_and_reload_with_equal_logits(tmp_path):
    model = tiny_model("llama")  # layers 64 and 128 wide: every one padded
    oneshot(model, blocks_only(), token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    path = save_compressed(model, tmp_path / "ckpt", progress=False)
    check_read_back(model, path, WEIGHT_ONLY)
    check_reload(model, path, PROBE)


def test_padded_blocks_on_experts_read_back_exactly_and_reload_with_equal_logits(tmp_path):
    model = tiny_moe("qwen3_moe")  # experts 16 x 32 and 32 x 16: one padded block each
    oneshot(model, blocks_only(), tokens(4, 16), num_calibration_samples=4, progress=False)
    path = save_compressed(model, tmp_path / "ckpt", progress=False)
    check_read_back(model, path, WEIGHT_ONLY)
    check_reload(model, path, tokens(2, 10, seed=5))
