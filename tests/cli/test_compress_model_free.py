"""``lightning-compress compress --model_free`` quantizes a checkpoint directory without loading
it, writing what ``model_free_compress`` writes, and refuses options it cannot honour."""

from __future__ import annotations

import pytest
import torch
import yaml
from cli_checkpoints import save_checkpoint
from safetensors.torch import load_file

from lightning_compress.export import model_free_compress
from lightning_compress.lightning.compress_command import run_compress

RECIPE = {
    "quant_modifiers": {
        "QuantizationModifier": {
            "ignore": ["lm_head"],
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
                }
            },
        }
    }
}


def test_compress_model_free_writes_the_model_free_checkpoint_and_tokenizer(tmp_path):
    source = save_checkpoint(tmp_path / "source", dtype=torch.bfloat16)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    argv = ["--model", str(source), "--recipe", str(recipe), "--output_dir", str(tmp_path / "cli")]
    assert run_compress([*argv, "--model_free", "--workers", "1"]) is None
    expected = model_free_compress(source, RECIPE, tmp_path / "api", progress=False)
    ours, theirs = (load_file(path / "model.safetensors") for path in (tmp_path / "cli", expected))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert (tmp_path / "cli" / "tokenizer.json").is_file()


def test_compress_model_free_refuses_a_dataset(tmp_path, capsys):
    source = save_checkpoint(tmp_path / "source", dtype=torch.bfloat16)
    argv = ["--model", str(source), "--recipe", yaml.safe_dump(RECIPE), "--model_free"]
    with pytest.raises(SystemExit):
        run_compress([*argv, "--output_dir", str(tmp_path / "out"), "--dataset", "data.txt"])
    assert "--dataset cannot be used with it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_compress(argv)
    assert "--output_dir is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
