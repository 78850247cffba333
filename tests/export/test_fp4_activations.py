"""Checkpoints of the presets with fp4 and MX activations (NVFP4, MXFP4, MXFP8, MXFP4XFP8):
the activation arguments and NVFP4's ``input_global_scale`` stored as compressed-tensors and
vLLM read them, and transformers runs the checkpoint with the same logits."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES as CT_PRESETS
from export_models import ARCHITECTURE, QUIET, preset, token_ids
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers.quantization.runtime import remove_quantization

PROBE = torch.tensor([[3, 17, 99, 5, 64, 2, 77, 11, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
FORMATS = {
    "NVFP4": "nvfp4-pack-quantized",
    "MXFP4": "mxfp4-pack-quantized",
    "MXFP8": "mxfp8-quantized",
    "MXFP4XFP8": "mxfp4-pack-quantized",
}
INPUT_TENSORS = {"NVFP4": {"input_global_scale"}}
"""What a layer stores for its input: NVFP4 its calibrated global scale, the dynamic MX
activations nothing."""


def quantized_llama(scheme: str) -> nn.Module:
    """A bfloat16 tiny Llama, 128 wide (MXFP4XFP8's activation groups of 128 divide it), its
    rotary frequencies in float32 as transformers loads them: fp4 activations turn a rounding
    difference of the attention into a step of their grid."""
    torch.manual_seed(0)
    config = LlamaConfig(**{**ARCHITECTURE, "hidden_size": 128, "intermediate_size": 256})
    model = LlamaForCausalLM(config).eval()
    rotary = dict(model.model.rotary_emb.named_buffers())
    model.to(torch.bfloat16)
    for name, frequencies in rotary.items():  # float32, as from_pretrained keeps them
        model.model.rotary_emb.register_buffer(name, frequencies, persistent=False)
    oneshot(model, preset(scheme), token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    return model


@pytest.mark.parametrize("scheme", list(FORMATS))
def test_activation_checkpoint_stores_what_vllm_reads_and_loads_in_transformers(scheme, tmp_path):
    model = quantized_llama(scheme)
    path = save_compressed(model, tmp_path / "ckpt")
    config = QuantizationConfig.model_validate(
        json.loads((path / "config.json").read_text())["quantization_config"]
    )
    assert config.format == FORMATS[scheme]
    (group,) = config.config_groups.values()
    calibration = {"observer", "observer_kwargs"}  # how it was calibrated: nothing to load
    assert group.input_activations.model_dump(exclude=calibration) == CT_PRESETS[scheme][
        "input_activations"
    ].model_dump(exclude=calibration)

    stored = load_file(path / "model.safetensors")
    q_proj = "model.layers.0.self_attn.q_proj"
    input_tensors = {key.rpartition(".")[2] for key in stored if key.startswith(f"{q_proj}.input")}
    assert input_tensors == INPUT_TENSORS.get(scheme, set())
    if scheme == "NVFP4":  # 448 * 6 / max|x| in float32, the large value vLLM inverts
        for name, module in model.named_modules():
            if hasattr(module, "input_global_scale"):
                saved = stored[f"{name}.input_global_scale"]
                assert saved.dtype == torch.float32 and saved.shape == (1,)
                assert torch.equal(saved, module.input_global_scale)
                assert 1 < float(saved) < float("inf")

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = model(PROBE).logits.float(), loaded(PROBE).logits.float()
        remove_quantization(model)  # weights stay quantized, activations run in bfloat16
        weight_only = model(PROBE).logits.float()
    # same weights and activation numerics; bfloat16 matmuls of another kernel order differ
    # by about one rounding
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2)
    # the activations were quantized: that changes the logits more than reloading does
    assert (weight_only - expected).abs().max() > 2 * (got - expected).abs().max()


def test_load_compressed_restores_nvfp4_activations(tmp_path):
    model = quantized_llama("NVFP4")
    path = save_compressed(model, tmp_path / "ckpt")
    loaded = load_compressed(path)
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    with torch.no_grad():
        assert torch.equal(loaded(PROBE).logits, model(PROBE).logits)
