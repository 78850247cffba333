"""The shipped smoothing recipes and compress configs run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from modifiers.smoothing.models import calibrate, expected_mappings, tiny_decoder

from lightning_compress.cli import main

CONFIGS = Path(__file__).parents[3] / "configs"
RECIPES = ["smoothquant_gptq_w8a8.yaml", "awq_w4a16.yaml"]
COMPRESS = ["smoothquant_gptq_w8a8_bundled.yaml", "awq_w4a16_bundled.yaml"]
TINY_MODEL = {
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


@pytest.mark.parametrize("name", RECIPES)
def test_the_shipped_recipe_smooths_then_quantizes(name):
    model = tiny_decoder()
    smoother, quantizer = calibrate(model, CONFIGS / "recipes" / name)
    assert smoother.smoothed == expected_mappings("tiny_decoder_gqa")
    layer = model.get_submodule("model.layers.1.mlp.down_proj")
    assert hasattr(layer, "weight_scale") and not hasattr(model.lm_head, "weight_scale")


@pytest.mark.parametrize("name", COMPRESS)
def test_the_shipped_compress_config_runs(name, tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "compress" / name).read_text())
    config["model"] = TINY_MODEL
    config.update(num_calibration_samples=4, max_seq_length=32, batch_size=2)
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # keeps the modifier order
    main(["compress", "--config", str(path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Perplexity on 16 windows .*: [\d.]+ before compression, [\d.]+ after", line
    ), line
