"""``lightning-compress compress --config ...`` runs in-process."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from helpers import int8_channel_groups

from lightning_compress.bundled.loading import CHECKPOINT_NAME, DATA_DIR
from lightning_compress.cli import main

SHIPPED = Path(__file__).parents[2] / "configs" / "compress" / "w4a16_rtn_bundled.yaml"
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
                    "num_heads": 4,
                    "max_seq_len": 64,
                }
            },
        }
    },
}


def test_compress_subcommand_compresses_and_prints_perplexity(tmp_path, capsys):
    config = yaml.safe_load(SHIPPED.read_text())
    config["model"] = TINY_MODEL
    config.update(num_calibration_samples=4, max_seq_length=32, batch_size=2)
    rtn = config["recipe"]["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    del rtn["scheme"]
    rtn["config_groups"] = int8_channel_groups()
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["compress", "--config", str(path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(
        r"Perplexity on 16 windows of the bundled evaluation text: "
        r"([\d.]+) before compression, ([\d.]+) after",
        line,
    )
    assert match is not None, line
    assert match[1] != match[2]


def test_the_shipped_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--config", str(SHIPPED), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    modifier = printed["recipe"]["quant_stage"]["quant_modifiers"]["QuantizationModifier"]
    assert modifier["scheme"] == "W4A16"
    assert printed["max_seq_length"] == 256 and printed["trainer"]["accelerator"] == "cpu"


@pytest.mark.skipif(
    not (DATA_DIR / CHECKPOINT_NAME).exists(), reason="the bundled checkpoint is not present"
)
def test_the_shipped_config_runs(capsys):
    main(["compress", "--config", str(SHIPPED)])
    assert "before compression" in capsys.readouterr().out


def test_the_compression_trainer_compresses_after_training_in_python():
    from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
    from lightning_compress.lightning.cli import CompressionTrainer

    config = TinyDecoderConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2)
    model = TinyDecoder(config)
    trainer = CompressionTrainer(
        accelerator="cpu", inference_mode=False, logger=False, enable_progress_bar=False
    )
    recipe = {
        "q_modifiers": {
            "GPTQModifier": {"config_groups": int8_channel_groups(), "ignore": ["lm_head"]}
        }
    }
    compressed = trainer.compress(
        model, recipe=recipe, num_calibration_samples=2, max_seq_length=16
    )
    assert compressed is model
    assert hasattr(model.get_submodule("model.layers.0.mlp.down_proj"), "weight_scale")
