"""Bad inputs and failures: clear errors, and never a half-written checkpoint."""

from __future__ import annotations

import pytest
import torch
from helpers import int8_channel_groups
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import CompressionSession
from lightning_compress.export import ExportError, save_compressed
from lightning_compress.export import writer as export_writer
from lightning_compress.modifiers.quantization import QuantizationModifier


def test_an_existing_directory_is_kept_unless_overwrite(compressed, tmp_path):
    model = compressed("llama", "W4A16")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=rf"{target}.*not empty.*overwrite=True"):
        save_compressed(model, target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

    save_compressed(model, target, overwrite=True)
    assert not (target / "notes.txt").exists()
    assert (target / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging left over


def test_a_failure_mid_save_leaves_no_directory(compressed, tmp_path, monkeypatch):
    model = compressed("llama", "W4A16")

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_writer, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []

    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "config.json").write_text("{}")
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, previous, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    assert (previous / "config.json").read_text() == "{}"


def test_a_group_index_cannot_be_expressed(compressed, tmp_path):
    model = compressed("llama", "W4A16")
    layer = model.model.layers[1].mlp.up_proj
    layer.register_buffer("weight_g_idx", torch.arange(64) // 32)
    with pytest.raises(ExportError, match=r"'model\.layers\.1\.mlp\.up_proj'.*actorder"):
        save_compressed(model, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_a_weight_changed_after_quantization_is_refused(compressed, tmp_path):
    model = compressed("llama", "W4A16")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.add_(1e-3)
    with pytest.raises(ExportError, match=r"'model\.layers\.0\.self_attn\.o_proj'.*grid"):
        save_compressed(model, tmp_path / "ckpt")


def test_unfinished_quantization_aware_training_is_refused(tiny_model, tmp_path):
    model = tiny_model("llama")
    session = CompressionSession()
    session.initialize(
        recipe=[QuantizationModifier(config_groups=int8_channel_groups(["Linear"]), start=0)],
        model=model,
    )
    with pytest.raises(ExportError, match="not finished.*finalize"):
        save_compressed(model, tmp_path / "ckpt")


def test_a_model_transformers_loaded_compressed_is_refused(compressed, tmp_path):
    path = save_compressed(compressed("llama", "W4A16"), tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(ExportError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*load_comp"):
        save_compressed(loaded, tmp_path / "again")


def test_only_transformers_models_and_the_tiny_decoder_are_exported(tmp_path):
    with pytest.raises(TypeError, match="holds 0 exportable models"):
        save_compressed(nn.Sequential(nn.Linear(4, 4)), tmp_path / "ckpt")
    config = TinyDecoderConfig(hidden_size=32, intermediate_size=64, num_layers=1)
    with pytest.raises(TypeError, match="tokenizer: expected a transformers tokenizer"):
        save_compressed(TinyDecoder(config), tmp_path / "ckpt", tokenizer=object())
    assert not (tmp_path / "ckpt").exists()


def test_a_model_whose_pretrained_config_names_no_architecture_is_refused(tmp_path):
    class Described(TinyDecoder):
        def pretrained_config(self):
            config = super().pretrained_config()
            config.architectures = None
            return config

    config = TinyDecoderConfig(hidden_size=32, intermediate_size=64, num_layers=1)
    with pytest.raises(TypeError, match=r"Described\.pretrained_config\(\) names no architec"):
        save_compressed(Described(config), tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
