"""What the checkpoint directory holds: config groups, shards, sizes, extras."""

from __future__ import annotations

import json
import struct

import torch
from transformers import AutoModelForCausalLM

from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.recipe import Recipe

QUIET = {"enable_progress_bar": False, "logger": False}
MLP = ["gate_proj", "up_proj", "down_proj"]


def quantization_config(path) -> dict:
    return json.loads((path / "config.json").read_text()).get("quantization_config")


def header(path) -> dict:
    """The safetensors header: tensor name to ``{dtype, shape, data_offsets}``."""
    with open(path, "rb") as file:
        (length,) = struct.unpack("<Q", file.read(8))
        return json.loads(file.read(length))


def test_mixed_schemes_become_one_group_each_and_load_back(tiny_model, token_ids, tmp_path):
    model = tiny_model("llama")
    mlp_group = {
        "targets": ["re:.*mlp[.].*_proj$"],
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
    }
    attention_group = {
        "targets": ["re:.*self_attn[.].*_proj$"],
        "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True},
    }
    recipe = [
        QuantizationModifier(
            config_groups={"mlp": mlp_group, "attention": attention_group}, ignore=["lm_head"]
        )
    ]
    oneshot(model, recipe, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    path = save_compressed(model, tmp_path / "ckpt", recipe=recipe)

    config = quantization_config(path)
    assert config["format"] == "mixed-precision"
    named, by_class = config["config_groups"].values()
    assert named["format"] == "pack-quantized"
    assert named["targets"] == [f"model.layers.{i}.mlp.{proj}" for i in range(2) for proj in MLP]
    assert by_class["format"] == "int-quantized"
    assert by_class["targets"] == ["Linear"]
    assert by_class["input_activations"]["strategy"] == "token"
    assert config["ignore"] == ["lm_head"]
    assert Recipe.create_instance(str(path / "recipe.yaml")) == Recipe.create_instance(recipe)

    with torch.no_grad():
        probe = token_ids(2, 10, seed=5)
        expected = model(probe).logits
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(path)(probe).logits, expected, rtol=0, atol=0
        )


def test_int4_weights_take_a_quarter_of_the_fp16_bytes(compressed, tmp_path):
    model = compressed("llama", "W4A16").half()
    path = save_compressed(model, tmp_path / "ckpt")
    tensors = header(path / "model.safetensors")
    layers = [name for name, module in model.named_modules() if hasattr(module, "weight_scale")]
    for name in layers:
        out_features, in_features = model.get_submodule(name).weight.shape
        fp16_bytes = out_features * in_features * 2
        stored = {
            key: entry["data_offsets"][1] - entry["data_offsets"][0]
            for key, entry in tensors.items()
            if key.rpartition(".")[0] == name
        }
        assert stored[f"{name}.weight_packed"] * 4 == fp16_bytes
        assert fp16_bytes / sum(stored.values()) > 3.5
    assert tensors["lm_head.weight"]["dtype"] == "F16"


def test_a_model_never_compressed_is_saved_plainly_in_shards(tiny_model, tmp_path):
    model = tiny_model("qwen2")
    path = save_compressed(model, tmp_path / "ckpt", max_shard_bytes=100_000)

    assert quantization_config(path) is None
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert sorted(p.name for p in path.glob("*.safetensors")) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied to the embeddings
    assert (path / "generation_config.json").is_file()
    assert not (path / "recipe.yaml").exists()
    assert json.loads((path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    for loaded in (AutoModelForCausalLM.from_pretrained(path), load_compressed(path)):
        for name, tensor in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[name], tensor), name
