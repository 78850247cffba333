"""GPT-2's ``Conv1D`` and Falcon's ``FalconLinear`` are compressed as every other linear layer.

``Conv1D`` becomes an ``nn.Linear`` with the transposed weight before modifiers run, so GPTQ and
SparseGPT on it equal GPTQ and SparseGPT on the transposed ``nn.Linear``; checkpoints keep
``Conv1D``'s ``.weight`` orientation. ``FalconLinear`` derives from ``nn.Linear``, so ``Linear``
targets it.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D as TransformersConv1D

from lightning_compress.core import match_named_modules
from lightning_compress.export import load_compressed, save_compressed
from lightning_compress.layers import linearize
from lightning_compress.layers.conv1d import Conv1D, Conv1DAdapter, conv1d_orientation
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import (
    AWQModifier,
    GPTQModifier,
    QuantizationModifier,
    SmoothQuantModifier,
    SparseGPTModifier,
)
from lightning_compress.modifiers.pruning.structure import follows_2_4

VOCAB = 96
QUIET = {"enable_progress_bar": False, "logger": False}
W4_GROUP = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}
GPT2_LAYERS = [
    f"transformer.h.{block}.{layer}"
    for block in range(2)
    for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
]


def gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_inner=128, n_layer=2, n_head=4, n_positions=32
    )
    config.bos_token_id = config.eos_token_id = 0
    return transformers.GPT2LMHeadModel(config).eval()


def falcon() -> transformers.FalconForCausalLM:
    torch.manual_seed(0)
    config = transformers.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    config.bos_token_id = config.eos_token_id = 0
    return transformers.FalconForCausalLM(config).eval()


def token_ids(count: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (count, length), generator=torch.Generator().manual_seed(seed))


def with_plain_linears(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Conv1D layers are hand-built ``nn.Linear`` s (``weight.T``)."""
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, TransformersConv1D):
            linear = nn.Linear(module.nx, module.nf)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def test_a_linearized_conv1d_is_a_linear_with_the_transposed_weight():
    conv = TransformersConv1D(5, 7).double()
    conv.bias.data.normal_()
    conv.weight.requires_grad_(False)
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    linear = Conv1DAdapter().linearize(conv)
    assert isinstance(linear, nn.Linear)
    assert (linear.in_features, linear.out_features) == (7, 5)
    assert torch.equal(linear.weight, conv.weight.t()) and torch.equal(linear.bias, conv.bias)
    assert linear.weight.dtype == torch.float64 and not linear.weight.requires_grad
    assert linear.bias.requires_grad and linear.training == conv.training
    assert linear.weight.data_ptr() != conv.weight.data_ptr()  # the original stays as it was
    torch.testing.assert_close(linear(x), conv(x), rtol=1e-12, atol=1e-12)


def test_every_conv1d_of_gpt2_is_swapped_once_and_the_logits_stay():
    model = gpt2()
    ids = token_ids(2)
    expected = model(ids).logits
    assert len(linearize(model)) == len(GPT2_LAYERS)
    assert not any(isinstance(m, TransformersConv1D) for m in model.modules())
    assert [name for name, m in model.named_modules() if isinstance(m, Conv1D)] == GPT2_LAYERS
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert len(linearize(model)) == 0


def test_undoing_the_swap_puts_the_conv1d_layers_back():
    model = gpt2()
    originals = {name: model.get_submodule(name) for name in GPT2_LAYERS}
    linearize(model).undo()
    assert {name: model.get_submodule(name) for name in GPT2_LAYERS} == originals


def test_a_conv1d_with_a_malformed_weight_is_refused_before_anything_changes():
    model = gpt2()
    layer = model.transformer.h[1].mlp.c_fc
    layer.weight = nn.Parameter(layer.weight.data.t().contiguous())
    with pytest.raises(ValueError, match=r"Conv1D 'transformer.h.1.mlp.c_fc'.*expected a weight"):
        linearize(model)
    assert all(isinstance(model.get_submodule(name), TransformersConv1D) for name in GPT2_LAYERS)


@pytest.mark.parametrize("target", ["Conv1D", "Linear"])
def test_conv1d_and_linear_targets_select_the_linearized_layers(target):
    model = gpt2()
    linearize(model)
    selected = list(match_named_modules(model, target, ignore="lm_head"))
    assert selected == GPT2_LAYERS


def test_checkpoints_hold_conv1d_weights_in_conv1d_orientation_and_read_back():
    model = gpt2()
    state = model.state_dict()
    linearize(model)
    stored = conv1d_orientation(model, model.state_dict())
    assert stored.keys() == state.keys()
    assert all(torch.equal(stored[key], state[key]) for key in state)
    restored = conv1d_orientation(model, stored)
    assert all(torch.equal(restored[key], model.state_dict()[key]) for key in state)


@pytest.mark.parametrize(
    "modifier",
    [
        lambda: GPTQModifier(
            config_groups={"g": {"targets": ["Linear"], "weights": W4_GROUP}}, ignore=["lm_head"]
        ),
        lambda: SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]),
    ],
    ids=["gptq", "sparsegpt"],
)
def test_compressing_conv1d_equals_compressing_the_transposed_linear(modifier):
    model = gpt2()
    reference = with_plain_linears(model)
    ids = token_ids()
    for each in (model, reference):
        oneshot(each, modifier(), ids, num_calibration_samples=8, trainer_kwargs=QUIET)
    for name in GPT2_LAYERS:
        layer, expected = model.get_submodule(name), reference.get_submodule(name)
        assert isinstance(layer, Conv1D)
        assert torch.equal(layer.weight, expected.weight), name
        buffers, expected_buffers = dict(layer.named_buffers()), dict(expected.named_buffers())
        assert buffers.keys() == expected_buffers.keys()
        assert all(torch.equal(buffers[key], expected_buffers[key]) for key in buffers), name


def _w4() -> dict:
    return {"config_groups": {"g": {"targets": ["Linear"], "weights": W4_GROUP}}}


RECIPES = {
    "gptq_w4": lambda: [GPTQModifier(**_w4(), ignore=["lm_head"])],
    "sparsegpt_2of4": lambda: [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"])
    ],
    "smoothquant_w8a8": lambda: [
        SmoothQuantModifier(smoothing_strength=0.8),
        QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"]),
    ],
    "awq_rtn_w4": lambda: [
        AWQModifier(weights=W4_GROUP),
        QuantizationModifier(**_w4(), ignore=["lm_head"]),
    ],
}
MODELS = {"gpt2": gpt2, "falcon": falcon}
DEFAULT_CELLS = {
    ("gpt2", "gptq_w4"),
    ("gpt2", "sparsegpt_2of4"),
    ("gpt2", "smoothquant_w8a8"),
    ("falcon", "smoothquant_w8a8"),
}


TRANSFORMERS_LOADS = {
    ("gpt2", "sparsegpt_2of4"),
    ("falcon", "sparsegpt_2of4"),
    ("falcon", "smoothquant_w8a8"),
}
"""The checkpoints transformers 5.25 reads back. Its GPT-2 is built of ``Conv1D`` layers, which
compressed-tensors 0.20 never quantizes (``apply_quantization_config`` initializes only
``nn.Linear`` and ``nn.Embedding``): their quantized tensors are dropped as unexpected and the
weights left random. Falcon's ``_init_weights`` reads ``FalconLinear.weight``, which a packed
(``weight_packed``) layer no longer has, so int4 Falcon checkpoints raise."""


def _cells() -> list:
    return [
        pytest.param(
            kind,
            recipe,
            marks=[] if (kind, recipe) in DEFAULT_CELLS else [pytest.mark.slow],
            id=f"{kind}-{recipe}",
        )
        for kind in MODELS
        for recipe in RECIPES
    ]


def _block_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("transformer.h.")
    }


def _compressed(layer: nn.Linear, recipe: str) -> bool:
    if recipe == "sparsegpt_2of4":
        return follows_2_4(layer.weight)
    return hasattr(layer, "weight_scale")


def _check_vllm_orientation(checkpoint: Path) -> None:
    """vLLM's GPT-2 transposes every ``.weight`` of ``c_attn``/``c_proj``/``c_fc`` it loads
    (``Conv1D``'s ``[in, out]``) and nothing else: packed weights and qparams are ``[out, ...]``.
    """
    with safe_open(checkpoint / "model.safetensors", "pt") as stored:
        shapes = {
            key.rpartition(".")[2]: tuple(stored.get_slice(key).get_shape())
            for key in stored.keys()  # noqa: SIM118 (safe_open is not iterable)
            if key.startswith("transformer.h.0.mlp.c_fc.")
        }
    assert shapes.pop("bias") == (128,)
    if "weight" in shapes:  # dense, or int8 codes
        assert shapes.pop("weight") == (64, 128)
    assert all(shape[0] == 128 for key, shape in shapes.items() if key != "weight_shape")


@pytest.mark.parametrize(("kind", "recipe"), _cells())
def test_every_block_weight_is_compressed_and_the_checkpoint_reloads(kind, recipe, tmp_path):
    model = MODELS[kind]()
    oneshot(model, RECIPES[recipe](), token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)
    layers = _block_layers(model)
    assert len(layers) == 8
    assert [name for name, layer in layers.items() if not _compressed(layer, recipe)] == []
    probe = token_ids(2, 10, seed=4)
    expected = model(probe).logits
    save_compressed(model, tmp_path, progress=False)
    if kind == "gpt2":
        _check_vllm_orientation(tmp_path)
    reloaded = load_compressed(tmp_path)
    torch.testing.assert_close(reloaded(probe).logits, expected, rtol=1e-5, atol=1e-5)
    if (kind, recipe) in TRANSFORMERS_LOADS:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        torch.testing.assert_close(loaded(probe).logits, expected, rtol=1e-5, atol=1e-5)
