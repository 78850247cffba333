"""NVFP4, MXFP4, MXFP6 and MXFP8 checkpoints: stored by compressed-tensors' own compressors,
every layer read back exactly, and loaded by transformers."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationConfig
from export_models import QUIET, preset, tiny_model, token_ids
from loguru import logger
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.export import ExportError, load_compressed, save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

FORMATS = {
    "NVFP4A16": ("nvfp4-pack-quantized", {"weight_packed", "weight_scale", "weight_global_scale"}),
    "MXFP4A16": ("mxfp4-pack-quantized", {"weight_packed", "weight_scale"}),
    "MXFP8A16": ("mxfp8-quantized", {"weight", "weight_scale"}),
    "MXFP6A16": ("mxfp6-pack-quantized", {"weight_packed", "weight_scale"}),
}
"""Preset: its compressed-tensors format and the tensors stored per layer."""
STORED = {"weight_packed": torch.uint8, "weight": torch.float8_e4m3fn}
"""The stored weight (packed fp4 pairs, or fp8 values) and its dtype."""
PROBE = torch.tensor([[3, 17, 99, 5, 64, 2, 77, 11, 8, 120], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


def fp4_model(
    scheme: str, dtype: torch.dtype = torch.bfloat16, algorithm: str = "RTN"
) -> torch.nn.Module:
    model = tiny_model("llama").to(dtype)
    recipe = (
        GPTQModifier(scheme=scheme, targets=["Linear"], ignore=["lm_head"])
        if algorithm == "GPTQ"
        else preset(scheme)
    )
    oneshot(model, recipe, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    return model


@pytest.mark.parametrize("algorithm", ["RTN", "GPTQ"])
@pytest.mark.parametrize("scheme", list(FORMATS))
def test_fp4_checkpoint_reads_back_exactly_and_loads_in_transformers(scheme, algorithm, tmp_path):
    model = fp4_model(scheme, algorithm=algorithm)
    path = save_compressed(model, tmp_path / "ckpt")
    stored = load_file(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    fmt, names = FORMATS[scheme]
    assert config["format"] == fmt
    scheme_config = QuantizationConfig.model_validate(config).config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(fmt)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "weight_scale")}
    assert len(layers) == 14
    for name, module in layers.items():
        local = {
            key.removeprefix(f"{name}."): tensor
            for key, tensor in stored.items()
            if key.rpartition(".")[0] == name
        }
        assert set(local) == names
        (key,) = set(local) & set(STORED)
        assert local[key].dtype == STORED[key]
        assert local["weight_scale"].dtype == (
            torch.float8_e4m3fn if scheme == "NVFP4A16" else torch.uint8  # E8M0 exponents
        )
        # compressed-tensors' compressor packs the layer's own tensors to the same bytes
        tensors = {"weight": module.weight, **dict(module.named_buffers())}
        repacked = compressor.compress(tensors, scheme_config)
        assert torch.equal(repacked[key].view(torch.uint8), local[key].view(torch.uint8)), name
        weight = compressor.decompress(local, scheme_config)["weight"]
        assert weight.dtype == module.weight.dtype
        assert torch.equal(weight, module.weight.detach()), name

    if scheme == "NVFP4A16":  # the layers vLLM fuses share their global scale, the smallest
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            for fused in (
                [attention.q_proj, attention.k_proj, attention.v_proj],
                [mlp.gate_proj, mlp.up_proj],
            ):
                scales = {float(module.weight_global_scale) for module in fused}
                assert len(scales) == 1
                own = min(448 * 6 / module.weight.detach().abs().amax().item() for module in fused)
                assert scales.pop() == pytest.approx(own, rel=1e-2)

    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    with torch.no_grad():
        expected, got = model(PROBE).logits.float(), loaded(PROBE).logits.float()
    # same weights; bfloat16 matmuls of another kernel order differ by about one rounding
    torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2)


def test_fp4_in_float32_is_refused_with_the_dtype_to_use(tmp_path):
    model = fp4_model("MXFP4A16", torch.float32)
    error = r"mxfp4 weights .* in torch.float32: .* back in torch.bfloat16 only"
    with pytest.raises(ExportError, match=error):
        save_compressed(model, tmp_path / "ckpt")


def test_load_compressed_restores_nvfp4_global_scales_and_saves_them_again(tmp_path):
    model = fp4_model("NVFP4A16")
    path = save_compressed(model, tmp_path / "first")
    loaded = load_compressed(path)
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    again = save_compressed(loaded, tmp_path / "second")
    assert (
        load_file(again / "model.safetensors").keys()
        == load_file(path / "model.safetensors").keys()
    )


def test_saving_warns_when_layers_vllm_fuses_hold_different_nvfp4_global_scales(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    session = CompressionSession()  # quantization-aware: each layer its own global scale
    recipe = QuantizationModifier(scheme="NVFP4A16", targets=["Linear"], ignore=["lm_head"])
    session.initialize(recipe=dataclasses.replace(recipe, start=0), model=model)
    session.event(EventType.BATCH_START, global_step=0)
    model(token_ids(2, 8)).logits.float().sum().backward()
    session.finalize()
    messages = []
    handler = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    logger.enable("lightning_compress")  # the export tests' fixture silences it
    try:
        save_compressed(model, tmp_path / "ckpt")
    finally:
        logger.disable("lightning_compress")
        logger.remove(handler)
    warned = [message for message in messages if "different NVFP4 global scales" in message]
    assert len(warned) == 1 and "model.layers.0.self_attn.q_proj" in warned[0]
