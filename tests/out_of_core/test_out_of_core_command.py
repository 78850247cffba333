"""``lightning-compress compress --out_of_core``: the checkpoint compressed block by block."""

from __future__ import annotations

import pytest
import torch
import yaml
from cli_checkpoints import RECORDS, save_checkpoint, write_jsonl
from out_of_core_runs import assert_same_checkpoint

from lightning_compress.lightning import out_of_core_choice
from lightning_compress.lightning.compress_command import run_compress

W4_G32 = {"num_bits": 4, "strategy": "group", "group_size": 32}
GPTQ = {
    "quant_stage": {
        "quant_modifiers": {
            "GPTQModifier": {
                "ignore": ["lm_head"],
                "config_groups": {"w4": {"targets": ["Linear"], "weights": W4_G32}},
            }
        }
    }
}


def test_out_of_core_command_writes_the_in_memory_checkpoint(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "model", torch.bfloat16)
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    argv = ["--model", str(checkpoint), "--recipe", yaml.safe_dump(GPTQ), "--dataset", str(data)]
    argv += ["--num_calibration_samples", "4", "--max_seq_length", "32"]
    run_compress([*argv, "--output_dir", str(tmp_path / "in")])
    model = run_compress([*argv, "--output_dir", str(tmp_path / "out"), "--out_of_core"])
    assert_same_checkpoint(tmp_path / "in", tmp_path / "out")
    assert all(tensor.is_meta for tensor in model.parameters())
    assert (tmp_path / "out" / "tokenizer_config.json").is_file()


def test_out_of_core_command_refuses_what_it_cannot_do(tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "model")
    argv = ["--model", str(checkpoint), "--recipe", yaml.safe_dump(GPTQ), "--out_of_core"]
    with pytest.raises(SystemExit):
        run_compress(argv)
    assert "--out_of_core: needs --output_dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_compress([*argv, "--output_dir", str(tmp_path / "o"), "--dtype", "float16"])
    assert "cannot be combined with --dtype" in capsys.readouterr().err


def test_the_command_reads_a_model_too_large_for_the_memory_block_by_block(tmp_path, monkeypatch):
    checkpoint = save_checkpoint(tmp_path / "model", torch.bfloat16)
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    argv = ["--model", str(checkpoint), "--recipe", yaml.safe_dump(GPTQ), "--dataset", str(data)]
    argv += ["--num_calibration_samples", "4", "--max_seq_length", "32"]
    monkeypatch.setattr(out_of_core_choice, "available_memory", lambda: 1)
    loaded = run_compress([*argv, "--output_dir", str(tmp_path / "in"), "--out_of_core", "false"])
    assert not any(tensor.is_meta for tensor in loaded.parameters())
    model = run_compress([*argv, "--output_dir", str(tmp_path / "out")])
    assert all(tensor.is_meta for tensor in model.parameters())
    assert_same_checkpoint(tmp_path / "in", tmp_path / "out")
