"""KV-cache and attention scales in a compressed-tensors checkpoint: where vLLM reads them, in
compressed-tensors' shapes, and a config compressed-tensors and transformers accept."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs as CTQuantizationArgs
from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams
from export_models import QUIET, tiny_model, token_ids
from helpers import int8_channel_groups
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_compress.export import ExportError, load_compressed, save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.kv_cache import AttentionScheme, quantized_attention


def fp8(strategy: str) -> dict:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}


def calibrated(modifier: QuantizationModifier, dtype: torch.dtype = torch.float32) -> nn.Module:
    model = tiny_model("llama").to(dtype)
    oneshot(model, modifier, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    return model


def saved(model: nn.Module, path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    save_compressed(model, path, progress=False)
    config = json.loads((path / "config.json").read_text())["quantization_config"]
    return config, load_file(path / "model.safetensors")


def ct_qparam(strategy: str, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The scale compressed-tensors registers on an attention module for these states."""
    holder = nn.Module()
    args = CTQuantizationArgs(**fp8(strategy))
    initialize_qparams(holder, "k", args, (heads, None, head_dim), dtype, force_zero_point=False)
    return holder.k_scale


@pytest.mark.parametrize(
    ("strategy", "dtype"),
    [("tensor", torch.float32), ("attn_head", torch.float32), ("attn_head", torch.bfloat16)],
)
def test_kv_scales_are_saved_where_vllm_reads_them_in_compressed_tensors_shapes(
    strategy: str, dtype: torch.dtype, tmp_path: Path
) -> None:
    model = calibrated(QuantizationModifier(kv_cache_scheme=fp8(strategy)), dtype)
    config, tensors = saved(model, tmp_path / "ckpt")
    assert config["kv_cache_scheme"]["strategy"] == strategy
    assert config["kv_cache_scheme"]["type"] == "float"
    assert config["format"] == "dense"
    assert config["config_groups"] == {}
    assert config["ignore"] == []
    heads, head_dim = model.config.num_key_value_heads, model.config.head_dim
    expected = ct_qparam(strategy, heads, head_dim, dtype)
    for index, layer in enumerate(model.model.layers):
        for role in ("k", "v"):
            stored = tensors[f"model.layers.{index}.self_attn.{role}_scale"]
            assert (stored.shape, stored.dtype) == (expected.shape, expected.dtype)
            assert torch.equal(stored, getattr(layer.self_attn, f"{role}_scale"))
    assert not any(name.endswith("q_scale") for name in tensors)


def test_attention_group_is_saved_as_compressed_tensors_writes_attention_quantization(
    tmp_path: Path,
) -> None:
    weights = {"num_bits": 4, "strategy": "group", "group_size": 32}
    groups = {
        "linear": {"targets": ["Linear"], "weights": weights},
        "attention": {"targets": ["re:.*self_attn$"], "input_activations": fp8("attn_head")},
    }
    model = calibrated(QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    config, tensors = saved(model, tmp_path / "ckpt")
    attention_groups = [g for g in config["config_groups"].values() if g["weights"] is None]
    assert len(attention_groups) == 1
    assert attention_groups[0]["targets"] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]
    assert attention_groups[0]["input_activations"]["strategy"] == "attn_head"
    assert config["kv_cache_scheme"]["strategy"] == "attn_head"
    heads, head_dim = model.config.num_attention_heads, model.config.head_dim
    expected = ct_qparam("attn_head", heads, head_dim, torch.float32)
    assert tensors["model.layers.0.self_attn.q_scale"].shape == expected.shape


def test_compressed_tensors_and_transformers_accept_the_checkpoint(tmp_path: Path) -> None:
    model = calibrated(
        QuantizationModifier(
            config_groups=int8_channel_groups(), ignore=["lm_head"], kv_cache_scheme=fp8("tensor")
        )
    )
    config, _ = saved(model, tmp_path / "ckpt")
    ct_config = QuantizationConfig.model_validate(config)
    assert ct_config.kv_cache_scheme.strategy == "tensor"
    apply_quantization_config(tiny_model("llama"), ct_config)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    with torch.no_grad():
        expected = model(token_ids(2)).logits
        torch.testing.assert_close(reloaded(token_ids(2)).logits, expected)


def test_attention_modules_with_different_kv_arguments_are_refused(tmp_path: Path) -> None:
    model = calibrated(QuantizationModifier(kv_cache_scheme=fp8("tensor")))
    other = QuantizationArgs(type="float", strategy="tensor", observer="moving_average")
    model.model.layers[1].self_attn.attention_scheme = AttentionScheme(other)
    with pytest.raises(ExportError, match="different key/value arguments"):
        save_compressed(model, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("queries", [False, True])
def test_load_compressed_restores_the_attention_scales_and_saves_them_back(
    queries: bool, tmp_path: Path
) -> None:
    weights = {"num_bits": 8, "strategy": "channel"}
    groups = {"linear": {"targets": ["Linear"], "weights": weights}}
    if queries:
        attention = {"targets": ["re:.*self_attn$"], "input_activations": fp8("attn_head")}
        groups["attention"] = attention
    kv = fp8("attn_head")
    model = calibrated(
        QuantizationModifier(config_groups=groups, ignore=["lm_head"], kv_cache_scheme=kv)
    )
    config, tensors = saved(model, tmp_path / "first")
    loaded = load_compressed(tmp_path / "first")
    for original, restored in zip(model.model.layers, loaded.model.layers, strict=True):
        assert restored.self_attn.attention_scheme == original.self_attn.attention_scheme
        assert torch.equal(restored.self_attn.k_scale, original.self_attn.k_scale)
    with torch.no_grad(), quantized_attention(model), quantized_attention(loaded):
        torch.testing.assert_close(loaded(token_ids(2)).logits, model(token_ids(2)).logits)
    again, tensors_again = saved(loaded, tmp_path / "second")
    assert again == config
    assert tensors.keys() == tensors_again.keys()
    assert all(torch.equal(tensors[key], tensors_again[key]) for key in tensors)


def test_load_compressed_refuses_a_missing_kv_scale(tmp_path: Path) -> None:
    model = calibrated(QuantizationModifier(kv_cache_scheme=fp8("tensor")))
    _, tensors = saved(model, tmp_path / "ckpt")
    del tensors["model.layers.1.self_attn.v_scale"]
    save_file(tensors, tmp_path / "ckpt" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model.layers.1.self_attn.v_scale holds nothing"):
        load_compressed(tmp_path / "ckpt")
