"""The int presets of compressed-tensors 0.20 (W2A4 ... W7A16, W4AFP8) and FP8_BLOCK save and
load in transformers with the logits of the model in memory."""

from __future__ import annotations

import json

import pytest
import torch
from export_models import ARCHITECTURE, QUIET, preset, token_ids
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_compress.export import save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier

WIDE = {**ARCHITECTURE, "hidden_size": 128, "intermediate_size": 256, "num_key_value_heads": 4}
"""Layers 128 and 256 wide: the presets' groups and blocks of 128 divide them."""
PROBE = torch.tensor([[3, 17, 99, 5, 64, 2, 77, 11, 8, 120]])
FORMATS = {
    "W2A16": "pack-quantized",
    "W3A4": "int-quantized",
    "W4AFP8": "pack-quantized",
    "FP8_BLOCK": "float-quantized",
    "GPTQ FP8_BLOCK": "float-quantized",
}


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_preset_loads_in_transformers_with_equal_logits(scheme, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**WIDE)).eval()
    name = scheme.removeprefix("GPTQ ")
    recipe = (
        GPTQModifier(scheme=name, targets=["Linear"], ignore=["lm_head"])
        if scheme.startswith("GPTQ")
        else preset(name)
    )
    oneshot(model, recipe, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    path = save_compressed(model, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["format"] == FORMATS[scheme]
    loaded = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROBE).logits, model(PROBE).logits, rtol=1e-5, atol=1e-5)
