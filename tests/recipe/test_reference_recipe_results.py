"""llm-compressor's recipes give here what they ask there: which layers are compressed, with
which scheme, to which sparsity (the corpus test only checks that each one runs)."""

from __future__ import annotations

import torch
from export_models import token_ids
from recipe.test_reference_recipes import QUIET, ROOT, tiny_llama
from torch import nn

from lightning_compress import oneshot
from lightning_compress.modifiers.pruning.structure import follows_2_4

SPARSEGPT = "tests/sparsity/sparsegpt/recipes"


def run(path: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The tiny Llama compressed by the recipe at ``path``, and its weights before."""
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    oneshot(
        model,
        str(ROOT / path),
        token_ids(),
        num_calibration_samples=8,
        trainer_kwargs=QUIET,
        progress=False,
    )
    return model, before


def linears(model: nn.Module, prefix: str = "model.layers.") -> dict[str, nn.Linear]:
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith(prefix)
    }


def sparsity(layer: nn.Linear) -> float:
    return (layer.weight == 0).double().mean().item()


def untouched(model: nn.Module, before: dict[str, torch.Tensor], names: list[str]) -> bool:
    return all(torch.equal(model.get_submodule(n).weight, before[f"{n}.weight"]) for n in names)


def test_sparse_prunes_30_percent_of_the_linear_layers_of_the_two_named_decoder_layers():
    model, before = run(f"{SPARSEGPT}/sparse.yaml")
    pruned = {**linears(model, "model.layers.0."), **linears(model, "model.layers.1.")}
    assert len(pruned) == 14
    assert all(abs(sparsity(layer) - 0.3) < 0.01 for layer in pruned.values())
    rest = [name for name in linears(model) if name not in pruned] + ["lm_head"]
    assert untouched(model, before, rest)


def test_sparse_with_mask_structure_prunes_decoder_layer_0_two_of_four():
    model, before = run(f"{SPARSEGPT}/sparse_with_mask_structure.yaml")
    pruned = linears(model, "model.layers.0.")
    assert len(pruned) == 7
    assert all(follows_2_4(layer.weight) for layer in pruned.values())
    assert all(sparsity(layer) == 0.5 for layer in pruned.values())
    rest = [name for name in linears(model) if name not in pruned] + ["lm_head"]
    assert untouched(model, before, rest)


def test_tiny2_prunes_half_of_every_linear_layer_of_the_six_decoder_layers():
    model, before = run(f"{SPARSEGPT}/test_tiny2.yaml")
    assert len(linears(model)) == 42
    assert all(abs(sparsity(layer) - 0.5) < 0.01 for layer in linears(model).values())
    assert untouched(model, before, ["lm_head"])


def test_quant_and_sparse_leaves_layer_0_pruned_and_int8_on_its_grid_the_rest_int8():
    model, before = run(f"{SPARSEGPT}/quant_and_sparse.yaml")
    for name, layer in linears(model).items():
        weights = layer.quantization_scheme.weights
        assert (weights.type, weights.num_bits, weights.strategy) == ("int", 8, "channel")
        codes = layer.weight.double() / layer.weight_scale.double() + layer.weight_zero_point
        assert (codes - codes.round()).abs().max() < 1e-3, f"{name} is off its int8 grid"
        assert codes.round().min() >= -128 and codes.round().max() <= 127
        if name.startswith("model.layers.0."):
            assert 0.5 <= sparsity(layer) < 0.52, name
        else:
            assert sparsity(layer) < 0.05, name
    assert getattr(model.lm_head, "quantization_scheme", None) is None
    assert untouched(model, before, ["lm_head"])


def test_additional_sparsity_prunes_decoder_layer_0_to_70_percent_keeping_earlier_zeros():
    model, _ = run(f"{SPARSEGPT}/sparse.yaml")
    earlier = {name: layer.weight == 0 for name, layer in linears(model, "model.layers.0.").items()}
    oneshot(
        model,
        str(ROOT / SPARSEGPT / "additional_sparsity.yaml"),
        token_ids(),
        num_calibration_samples=8,
        trainer_kwargs=QUIET,
        progress=False,
    )
    for name, layer in linears(model, "model.layers.0.").items():
        assert abs(sparsity(layer) - 0.7) < 0.01, name
        assert (layer.weight[earlier[name]] == 0).all(), f"{name} lost a zero of the 30% pass"
    assert all(
        abs(sparsity(layer) - 0.3) < 0.01 for layer in linears(model, "model.layers.1.").values()
    )


def test_additional_sparsity_with_quant_prunes_layer_0_and_quantizes_its_q_proj_on_its_grid():
    model, before = run(f"{SPARSEGPT}/additional_sparsity_with_quant.yaml")
    pruned = linears(model, "model.layers.0.")
    assert all(abs(sparsity(layer) - 0.7) < 0.01 for layer in pruned.values())
    quantized = [n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")]
    assert quantized == ["model.layers.0.self_attn.q_proj"]
    q_proj = model.model.layers[0].self_attn.q_proj
    codes = q_proj.weight.double() / q_proj.weight_scale.double() + q_proj.weight_zero_point
    assert (codes - codes.round()).abs().max() < 1e-3
    rest = [name for name in linears(model) if name not in pruned] + ["lm_head"]
    assert untouched(model, before, rest)
