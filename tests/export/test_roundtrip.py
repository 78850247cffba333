"""Every exported scheme loads in transformers and gives the logits of the model in memory."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_compress.export import load_compressed, save_compressed

KINDS = ["llama", "qwen2"]
FORMATS = {
    "W4A16": "pack-quantized",
    "W8A8": "int-quantized",
    "FP8": "float-quantized",
    "2:4+W4A16": "pack-quantized",
}
PROBE = torch.tensor([[3, 17, 99, 5, 64, 2, 77, 11, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("scheme", list(FORMATS))
def test_transformers_loads_what_was_compressed(kind, scheme, compressed, tmp_path):
    model = compressed(kind, scheme)
    path = save_compressed(model, tmp_path / "ckpt")

    config = json.loads((path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == FORMATS[scheme]
    assert config["quantization_status"] == "compressed"
    assert config["kv_cache_scheme"] is None
    assert config["ignore"] == ["lm_head"]
    assert [group["targets"] for group in config["config_groups"].values()] == [["Linear"]]
    assert config["sparsity_config"] == {}

    loaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_compressed(path)), logits(model), rtol=0, atol=0)


def test_compressed_tensors_reads_every_weight_back(compressed, tmp_path):
    model = compressed("llama", "W4A16")
    path = save_compressed(model, tmp_path / "ckpt")
    stored = load_file(path / "model.safetensors")
    config = QuantizationConfig.model_validate(
        json.loads((path / "config.json").read_text())["quantization_config"]
    )
    scheme = config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    layers = {
        name: module for name, module in model.named_modules() if hasattr(module, "weight_scale")
    }
    assert len(layers) == 14
    for name, module in layers.items():
        local = {
            key.removeprefix(f"{name}."): tensor
            for key, tensor in stored.items()
            if key.rpartition(".")[0] == name
        }
        assert set(local) == {"weight_packed", "weight_shape", "weight_scale"}
        assert local["weight_packed"].dtype == torch.int32
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight, module.weight.detach()), name


def test_load_compressed_restores_quantization_and_saves_it_unchanged(compressed, tmp_path):
    model = compressed("llama", "W8A8")
    first = save_compressed(model, tmp_path / "first")
    loaded = load_compressed(first)
    q_proj = loaded.model.layers[0].self_attn.q_proj
    assert q_proj.quantization_scheme == model.model.layers[0].self_attn.q_proj.quantization_scheme
    assert q_proj.weight_scale.shape == (64, 1)
    assert q_proj._forward_pre_hooks  # dynamic per-token input quantization
    second = save_compressed(loaded, tmp_path / "second")
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)

    dense = load_compressed(first, keep_quantization=False)
    assert not any(hasattr(module, "quantization_scheme") for module in dense.modules())
    torch.testing.assert_close(dense.lm_head.weight, model.lm_head.weight)
    torch.testing.assert_close(
        dense.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight
    )
