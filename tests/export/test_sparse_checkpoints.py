"""Pruned checkpoints are written as current vLLM and compressed-tensors read them: no
``sparsity_config`` (an empty one beside quantization), the sparsity recorded in
``sparsity.json``; checkpoints written with a ``sparsity_config`` still load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.config import DenseSparsityConfig
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.export.sparsity import SPARSITY_NAME
from lightning_compress.modifiers import ConstantPruningModifier
from lightning_compress.recipe import Recipe

PROBE = torch.tensor([[3, 17, 99, 5, 64, 2, 77, 11, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
DECODER = "re:.*layers.*proj$"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def decoder_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight.detach()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and ".layers." in name
    }


def prune_unstructured(model: nn.Module, names: list[str]) -> None:
    """Zeroes the smaller half (and the median) of each named layer's weights."""
    with torch.no_grad():
        for name in names:
            weight = model.get_submodule(name).weight
            weight[weight.abs() <= weight.abs().median()] = 0


def test_a_2_4_pruned_model_is_saved_plainly_with_its_sparsity_recorded(
    tiny_model, prune_2_4, tmp_path
):
    model = tiny_model("llama")
    prune_2_4(model)
    recipe = [ConstantPruningModifier(targets=[DECODER])]
    path = save_compressed(model, tmp_path / "ckpt", recipe=recipe)

    assert "quantization_config" not in read_json(path / "config.json")
    record = read_json(path / SPARSITY_NAME)
    linears = decoder_linears(model)
    assert record["sparsity_structure"] == "2:4"
    assert set(record["layers"]) == set(linears)
    for name, weight in linears.items():
        assert record["layers"][name] == {
            "sparsity": pytest.approx(int((weight == 0).sum()) / weight.numel()),
            "sparsity_structure": "2:4",
        }
        assert record["layers"][name]["sparsity"] >= 0.5
    every = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    zeros = sum(int((weight == 0).sum()) for weight in every)
    assert record["global_sparsity"] == pytest.approx(zeros / sum(w.numel() for w in every))
    assert Recipe.create_instance(str(path / "recipe.yaml")) == Recipe.create_instance(recipe)

    loaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(load_compressed(path)), logits(model), rtol=1e-5, atol=1e-5)


def test_unstructured_pruning_is_recorded_for_the_pruned_layers_only(tiny_model, tmp_path):
    model = tiny_model("llama")
    pruned = [f"model.layers.{index}.mlp.down_proj" for index in (0, 1)]
    prune_unstructured(model, pruned)
    path = save_compressed(model, tmp_path / "ckpt")

    assert "quantization_config" not in read_json(path / "config.json")
    record = read_json(path / SPARSITY_NAME)
    assert record["sparsity_structure"] == "unstructured"
    assert set(record["layers"]) == set(pruned)
    assert {layer["sparsity_structure"] for layer in record["layers"].values()} == {"unstructured"}
    assert 0 < record["global_sparsity"] < 0.5
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for name in pruned:
        assert torch.equal(loaded.get_submodule(name).weight, model.get_submodule(name).weight)


def test_a_mix_of_2_4_and_unstructured_layers_is_recorded_per_layer(
    tiny_model, prune_2_4, tmp_path
):
    model = tiny_model("llama")
    dense = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    prune_2_4(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.copy_(dense)
    prune_unstructured(model, ["model.layers.0.mlp.up_proj"])
    path = save_compressed(model, tmp_path / "ckpt")

    record = read_json(path / SPARSITY_NAME)
    assert record["sparsity_structure"] == "unstructured"
    structures = {name: layer["sparsity_structure"] for name, layer in record["layers"].items()}
    assert structures.pop("model.layers.0.mlp.up_proj") == "unstructured"
    assert set(structures.values()) == {"2:4"}


def test_a_pruned_and_quantized_model_has_an_empty_sparsity_config(compressed, tmp_path):
    model = compressed("llama", "2:4+W4A16")
    path = save_compressed(model, tmp_path / "ckpt")

    config = read_json(path / "config.json")["quantization_config"]
    assert config["sparsity_config"] == {}
    assert config["format"] == "pack-quantized"
    record = read_json(path / SPARSITY_NAME)
    assert record["sparsity_structure"] == "2:4"
    assert set(record["layers"]) == set(decoder_linears(model))
    loaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_a_model_that_is_not_pruned_gets_no_sparsity_record(compressed, tmp_path):
    path = save_compressed(compressed("llama", "W4A16"), tmp_path / "ckpt")
    assert read_json(path / "config.json")["quantization_config"]["sparsity_config"] == {}
    assert not (path / SPARSITY_NAME).exists()


def old_sparsity_config(model: nn.Module) -> dict:
    """The ``sparsity_config`` earlier versions wrote for a 2:4 model: dense, targets Linear."""
    return DenseSparsityConfig(
        targets=["Linear"], ignore=["lm_head"], global_sparsity=0.49, sparsity_structure="2:4"
    ).model_dump()


def rewrite_config(path: Path, change) -> None:
    config = read_json(path / "config.json")
    change(config)
    (path / "config.json").write_text(json.dumps(config))


def test_an_old_pruned_checkpoint_with_a_sparsity_config_still_loads(
    tiny_model, prune_2_4, tmp_path
):
    model = tiny_model("llama")
    prune_2_4(model)
    path = save_compressed(model, tmp_path / "ckpt")
    (path / SPARSITY_NAME).unlink()
    entry = {
        "quant_method": "compressed-tensors",
        "sparsity_config": old_sparsity_config(model),
        "transform_config": {},
        "version": "0.13.0",
    }
    rewrite_config(path, lambda config: config.update(quantization_config=entry))

    torch.testing.assert_close(logits(load_compressed(path)), logits(model), rtol=1e-5, atol=1e-5)
    loaded = AutoModelForCausalLM.from_pretrained(path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


def test_an_old_pruned_and_quantized_checkpoint_still_loads_and_saves_anew(compressed, tmp_path):
    model = compressed("llama", "2:4+W4A16")
    path = save_compressed(model, tmp_path / "old")
    (path / SPARSITY_NAME).unlink()
    rewrite_config(
        path,
        lambda config: config["quantization_config"].update(
            sparsity_config=old_sparsity_config(model)
        ),
    )

    loaded = load_compressed(path)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    resaved = save_compressed(loaded, tmp_path / "new")
    assert read_json(resaved / "config.json")["quantization_config"]["sparsity_config"] == {}
    assert read_json(resaved / SPARSITY_NAME)["sparsity_structure"] == "2:4"
