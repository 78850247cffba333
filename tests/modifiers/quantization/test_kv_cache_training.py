"""The KV cache trained quantization-aware by the ``Compressor`` callback, then saved."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from export_models import ARCHITECTURE, token_ids
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress.export import save_compressed
from lightning_compress.lightning import Compressor
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.attention import registered_implementations

FP8_MAX = 448.0


class CausalLM(LightningModule):
    """A transformers causal LM trained on its own tokens, with a learning rate of 0 (so its
    keys and values stay those of the original model)."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_compressor_trains_the_kv_cache_scales_and_the_checkpoint_holds_them(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**ARCHITECTURE, "num_hidden_layers": 1}))
    reference = copy.deepcopy(model).eval()
    ids = token_ids(8)
    scheme = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "attn_head"}
    trainer = Trainer(
        max_steps=2,
        callbacks=[Compressor(QuantizationModifier(kv_cache_scheme=scheme, start=0))],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(CausalLM(model), DataLoader(ids, batch_size=4))
    with torch.no_grad():
        keys = reference(ids, use_cache=True).past_key_values.layers[0].keys
    expected = keys.transpose(0, 1).abs().amax(dim=(1, 2, 3)).reshape(-1, 1, 1) / FP8_MAX
    attention = model.model.layers[0].self_attn
    torch.testing.assert_close(attention.k_scale, expected, rtol=1e-5, atol=0)
    assert registered_implementations() == []
    save_compressed(model, tmp_path / "ckpt", progress=False)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["kv_cache_scheme"]["strategy"] == "attn_head"
