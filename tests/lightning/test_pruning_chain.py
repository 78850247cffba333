"""The shipped pruning recipes and configs run as written; 2:4 sparsity survives GPTQ."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress.cli import main
from lightning_compress.lightning.oneshot import oneshot

CONFIGS = Path(__file__).parents[2] / "configs"
QUIET = {"enable_progress_bar": False}


def tiny_llama(hidden_size: int = 64, intermediate_size: int = 128) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def token_ids(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head"
    }


def test_2of4_sparsity_survives_gptq_w4a16_in_the_same_pass():
    model = tiny_llama(hidden_size=128, intermediate_size=256)  # W4A16 groups of 128
    recipe = CONFIGS / "recipes" / "sparsegpt_2of4_gptq_w4a16.yaml"
    oneshot(model, recipe, dataset=token_ids(), num_calibration_samples=None, trainer_kwargs=QUIET)
    layers = block_linears(model)
    assert len(layers) == 14
    for name, layer in layers.items():
        assert hasattr(layer, "weight_scale"), name  # quantized by GPTQ
        kept = (layer.weight != 0).reshape(layer.weight.shape[0], -1, 4).sum(-1)
        # every group of 4 in every row keeps at most 2 (a kept weight may round to 0)
        assert (kept <= 2).all(), f"{name}: {(kept > 2).sum().item()} groups of 4 lost 2:4"
        assert (kept == 2).float().mean() > 0.9, name
    assert model.lm_head.weight.ne(0).all()


@pytest.mark.parametrize("recipe", ["sparsegpt_50.yaml", "wanda_50.yaml"])
def test_the_shipped_pruning_recipes_prune_half_of_every_layer(recipe):
    model = tiny_llama()
    oneshot(
        model,
        CONFIGS / "recipes" / recipe,
        dataset=token_ids(),
        num_calibration_samples=None,
        trainer_kwargs=QUIET,
    )
    for name, layer in block_linears(model).items():
        assert (layer.weight == 0).float().mean() == 0.5, name
    assert model.lm_head.weight.ne(0).all()


def test_the_shipped_sparsegpt_gptq_compress_config_runs(tmp_path, capsys):
    shipped = CONFIGS / "compress" / "sparsegpt_2of4_gptq_w4a16_bundled.yaml"
    config = yaml.safe_load(shipped.read_text())
    config["model"] = {
        "class_path": "lightning_compress.lightning.language_model.CausalLMModule",
        "init_args": {
            "model": {
                "class_path": "lightning_compress.bundled.TinyDecoder",
                "init_args": {
                    "config": {
                        "hidden_size": 64,
                        "intermediate_size": 128,
                        "num_layers": 2,
                        "max_seq_len": 64,
                    }
                },
            }
        },
    }
    config.update(num_calibration_samples=4, max_seq_length=32, batch_size=2)
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["compress", "--config", str(path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Perplexity on 16 windows .*: [\d.]+ before compression, [\d.]+ after", line
    ), line
