"""A checkpoint in this format trains on (kept zeros, QAT) and is saved when training ends."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_compress.export import ExportError, load_compressed, save_compressed
from lightning_compress.export.sparsity import SPARSITY_NAME, follows_2_4
from lightning_compress.lightning import Compressor
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.pruning import ConstantPruningModifier

DECODER_LINEARS = ["re:.*layers.*_proj$"]


def fit(model: torch.nn.Module, compressor: Compressor, token_ids) -> CausalLMModule:
    module = CausalLMModule(model.train(), lr=1e-2)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[compressor],
    )
    trainer.fit(module, DataLoader(token_ids(12, 16), batch_size=4))
    return module


def logits(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(probe).logits


def test_a_loaded_2_4_checkpoint_fine_tunes_with_its_zeros_kept(
    tiny_model, prune_2_4, token_ids, tmp_path
):
    model = tiny_model("llama")
    prune_2_4(model)
    sparse = save_compressed(model, tmp_path / "sparse")
    loaded = load_compressed(sparse)
    before = loaded.model.layers[0].mlp.up_proj.weight.detach().clone()

    compressor = Compressor(
        [ConstantPruningModifier(targets=DECODER_LINEARS)], save_dir=tmp_path / "tuned"
    )
    fit(loaded, compressor, token_ids)

    after = loaded.model.layers[0].mlp.up_proj.weight.detach()
    assert not torch.equal(after, before)
    assert torch.equal(after == 0, before == 0)
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert "quantization_config" not in config
    record = json.loads((tmp_path / "tuned" / SPARSITY_NAME).read_text())
    assert record["sparsity_structure"] == "2:4"
    assert (tmp_path / "tuned" / "recipe.yaml").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    assert follows_2_4(reloaded.model.layers[1].self_attn.k_proj.weight)
    probe = token_ids(2, 10, seed=4)
    torch.testing.assert_close(logits(reloaded, probe), logits(loaded, probe), rtol=0, atol=0)


def test_quantization_aware_training_from_a_loaded_checkpoint(
    compressed, token_ids, w4a16, tmp_path
):
    path = save_compressed(compressed("llama", "W4A16"), tmp_path / "w4a16")
    model = load_compressed(path, keep_quantization=False)
    groups = w4a16().config_groups
    with pytest.raises(ExportError, match="exists and is not empty"):
        qat = QuantizationModifier(config_groups=groups, ignore=["lm_head"], start=0)
        fit(model, Compressor([qat], save_dir=path), token_ids)

    qat = QuantizationModifier(config_groups=groups, ignore=["lm_head"], start=0)
    module = fit(model, Compressor([qat], save_dir=tmp_path / "qat"), token_ids)

    config = json.loads((tmp_path / "qat" / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    probe = token_ids(2, 10, seed=4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qat")
    torch.testing.assert_close(
        logits(reloaded, probe), logits(module.model, probe), rtol=1e-5, atol=1e-5
    )
