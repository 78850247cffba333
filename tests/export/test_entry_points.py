"""``oneshot(output_dir=...)`` and ``lightning-compress compress --output_dir`` save checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_compress.export import ExportError
from lightning_compress.lightning.compress_command import run_compress
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.recipe import Recipe

SHIPPED = Path(__file__).parents[2] / "configs" / "compress" / "w4a16_rtn_bundled.yaml"
TINY_DECODER = {
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
QUIET = {"enable_progress_bar": False, "logger": False}


def test_oneshot_saves_the_model_with_its_recipe(tiny_model, token_ids, w4a16, tmp_path):
    model = tiny_model("qwen2")
    recipe = [w4a16()]
    oneshot(
        model,
        recipe,
        token_ids(),
        num_calibration_samples=8,
        output_dir=tmp_path / "ckpt",
        trainer_kwargs=QUIET,
    )
    assert Recipe.create_instance(str(tmp_path / "ckpt" / "recipe.yaml")) == Recipe.create_instance(
        recipe
    )
    probe = token_ids(2, 12, seed=3)
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
        torch.testing.assert_close(loaded(probe).logits, model(probe).logits, rtol=0, atol=0)


def test_oneshot_refuses_an_occupied_output_dir_before_calibrating(
    tiny_model, token_ids, w4a16, tmp_path
):
    model = tiny_model("llama")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    (tmp_path / "old.txt").write_text("")
    with pytest.raises(ExportError, match="not empty"):
        oneshot(model, [w4a16()], token_ids(), num_calibration_samples=8, output_dir=tmp_path)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_the_compress_command_ends_in_a_served_format_checkpoint(tmp_path, capsys):
    config = yaml.safe_load(SHIPPED.read_text())
    config["model"]["init_args"] = {"model": TINY_DECODER}
    config.update(num_calibration_samples=4, max_seq_length=32, batch_size=2)
    weights = {"num_bits": 4, "strategy": "group", "group_size": 32}
    group = {"targets": ["Linear"], "weights": weights}
    config["recipe"]["quant_stage"]["quant_modifiers"]["QuantizationModifier"] = {
        "config_groups": {"group_0": group},
        "ignore": ["lm_head"],
    }
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config))
    output_dir = tmp_path / "tiny-w4a16"

    compressed = run_compress(["--config", str(path), "--output_dir", str(output_dir)])

    assert f"Saved the compressed model to {output_dir}" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "recipe.yaml", "tokenizer.json"} <= {
        p.name for p in output_dir.iterdir()
    }
    probe = AutoTokenizer.from_pretrained(output_dir)("It is a truth", return_tensors="pt")
    with torch.no_grad():
        expected = compressed(probe["input_ids"])
        loaded = AutoModelForCausalLM.from_pretrained(output_dir)(probe["input_ids"]).logits
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-5)
