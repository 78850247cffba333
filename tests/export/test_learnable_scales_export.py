"""A model trained with learnable weight scales saves exactly the scales it learned."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from lightning_compress.lightning import Compressor
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.learnable import round_scale

SCHEMES = {
    "W4A16": torch.float32,
    "FP8_DYNAMIC": torch.float32,
    "NVFP4A16": torch.bfloat16,
    "MXFP4A16": torch.bfloat16,
}
"""Preset and the model dtype it trains in (fp4 formats are refused in float32)."""


def stored_scale(tensor: torch.Tensor) -> torch.Tensor:
    """A saved ``weight_scale`` as a float32 scale (E8M0 exponents decoded)."""
    if tensor.dtype == torch.uint8:
        return torch.exp2(tensor.float() - 127)
    return tensor.float()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_checkpoint_holds_the_learned_scales_and_reloads_with_equal_logits(
    scheme, tiny_model, token_ids, w4a16, tmp_path
):
    model = tiny_model("llama").to(SCHEMES[scheme])
    # the tiny model's layers are 64 wide: W4A16's groups of 128 do not fit, so groups of 32
    recipe = {"config_groups": w4a16().config_groups} if scheme == "W4A16" else {"scheme": scheme}
    qat = QuantizationModifier(
        **recipe, targets=["Linear"], ignore=["lm_head"], start=0, learnable_scales=True
    )
    compressor = Compressor([qat], save_dir=tmp_path / "qat")
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
    layer = model.model.layers[0].mlp.up_proj
    seen = []  # the parametrization, set up when training starts, before each forward

    def record(module: torch.nn.Module, _) -> None:
        quantizer = module.parametrizations.weight[0]
        seen.append((quantizer, quantizer.scale.detach().clone()))

    hook = layer.register_forward_pre_hook(record)
    trainer.fit(module, DataLoader(token_ids(12, 16), batch_size=4))
    hook.remove()
    quantizer = seen[0][0]

    # the optimizer trained the scale after its first forward set it to the min-max scale
    assert len(seen) == 3
    assert not torch.equal(seen[1][1], quantizer.scale.detach())
    saved = load_file(tmp_path / "qat" / "model.safetensors")
    scale = stored_scale(saved["model.layers.0.mlp.up_proj.weight_scale"])
    learned = round_scale(quantizer.scale.detach(), qat.resolved_schemes()[0].weights, model.dtype)
    torch.testing.assert_close(scale, learned.float().reshape(scale.shape), rtol=0, atol=0)

    probe = token_ids(2, 10, seed=4)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "qat", dtype=model.dtype)
    with torch.no_grad():
        expected, got = model(probe).logits.float(), reloaded(probe).logits.float()
    tolerance = 1e-5 if model.dtype == torch.float32 else 1e-2  # bfloat16 kernel order
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
