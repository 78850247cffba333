"""llm-compressor's own recipe files run through ``oneshot`` on a tiny Llama.

The YAML files under ``reference_recipes/`` are copied unchanged (but for a licence header) from
the llm-compressor repository, keeping their paths there. Each one runs on a 6-layer Llama with
128-wide layers (the recipes' group size of 128 divides them) and must compress some decoder
layer. Recipes refused today are ``xfail(strict=True)`` with the reason they are refused, so the
list records what a user migrating a recipe meets (each refusal must give the reason written here),
and the test fails when one starts running.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from export_models import ARCHITECTURE, QUIET, token_ids
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress import oneshot
from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
from lightning_compress.recipe import Recipe

ROOT = Path(__file__).parent / "reference_recipes"
RECIPES = sorted(path.relative_to(ROOT).as_posix() for path in ROOT.rglob("*.yaml"))

REFUSED: dict[str, str] = {}


def corpus() -> list:
    """Each recipe's path, those refused today marked ``xfail`` with the reason."""
    return [
        pytest.param(
            path,
            id=path,
            marks=pytest.mark.xfail(strict=True, raises=ValueError, reason=REFUSED[path]),
        )
        if path in REFUSED
        else pytest.param(path, id=path)
        for path in RECIPES
    ]


def tiny_llama() -> nn.Module:
    """A 6-layer Llama (``test_tiny2`` names six decoder layers) with random weights whose
    linear layers are 128 or 256 wide."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{**ARCHITECTURE, "num_hidden_layers": 6, "hidden_size": 128, "intermediate_size": 256}
    )
    return LlamaForCausalLM(config).eval()


ARGUMENTS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


@dataclass
class Asked:
    """What a recipe asks of a model: a scheme per layer, pruning per layer, the KV cache."""

    schemes: dict[str, QuantizationScheme] = field(default_factory=dict)
    pruned: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # sparsity, N, M
    kv_cache: QuantizationArgs | None = None


def asked(path: str, model: nn.Module) -> Asked:
    """Reads the recipe with the project's parser and resolves its targets on ``model`` here,
    as llm-compressor reads them: a class name, a module name or ``re:`` a regex matched from
    the start of the name; a target that is a container means the layers inside it; ``ignore``
    drops a layer it or one of its parents matches. A later modifier's scheme replaces an
    earlier one; a quantizing modifier without a scheme of its own adds none."""
    recipe, result = Recipe.create_instance(str(ROOT / path)), Asked()
    for modifier in recipe.modifiers:
        ignore = getattr(modifier, "ignore", [])
        if hasattr(modifier, "resolved_schemes") and (modifier.scheme or modifier.config_groups):
            for scheme in modifier.resolved_schemes():
                result.schemes |= dict.fromkeys(targeted(model, scheme.targets, ignore), scheme)
        if getattr(modifier, "kv_cache_scheme", None) is not None:
            result.kv_cache = QuantizationArgs.from_dict(modifier.kv_cache_scheme)
        if hasattr(modifier, "sparsity") and hasattr(modifier, "mask_structure"):
            n, m = (int(part) for part in modifier.mask_structure.split(":"))
            for name in targeted(model, modifier.targets, ignore):
                result.pruned[name] = (float(modifier.sparsity), n, m)
    return result


def targeted(model: nn.Module, targets: list[str], ignore: list[str]) -> list[str]:
    """The layers that ``targets`` select (a container: the linear layers inside it), less
    ``ignore``."""
    chosen = []
    for name, module in model.named_modules():
        if matches(name, module, targets):
            inside = module.named_modules(prefix=name)
            linears = [inner for inner, layer in inside if isinstance(layer, nn.Linear)]
            chosen += [name] if is_layer(module) else linears
    return list(dict.fromkeys(name for name in chosen if not ignored(model, name, ignore)))


def ignored(model: nn.Module, name: str, ignore: list[str]) -> bool:
    """Whether ``ignore`` matches the layer ``name`` or one of its parents."""
    parts = name.split(".")
    parents = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(matches(parent, model.get_submodule(parent), ignore) for parent in parents)


def matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    """Whether a pattern is ``name``, ``module``'s class name, or ``re:`` a regex matching
    ``name`` from its start."""
    return any(
        re.match(pattern[3:], name)
        if pattern.startswith("re:")
        else pattern in (name, type(module).__name__)
        for pattern in patterns
    )


def is_layer(module: nn.Module) -> bool:
    """Whether ``module`` holds a weight of its own (a linear layer, an embedding, a norm)."""
    return isinstance(module._parameters.get("weight"), nn.Parameter)


def check_compressed_as_asked(model: nn.Module, before: dict[str, torch.Tensor], path: str) -> None:
    """Exactly the layers the recipe targets carry its scheme, those it prunes hold its zeros
    (at least: quantization may round more weights to zero) in its N:M pattern, the attention
    modules hold its KV-cache arguments, and every other layer is untouched."""
    want = asked(path, model)
    schemes = {
        name: module.quantization_scheme
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    }
    assert sorted(schemes) == sorted(want.schemes), f"{path}: other layers quantized than asked"
    for name, scheme in want.schemes.items():
        for role in ("weights", "input_activations"):
            expected, got = getattr(scheme, role), getattr(schemes[name], role)
            assert (expected is None) == (got is None), f"{name}.{role}: {got} for {expected}"
            for field_ in ARGUMENTS if expected is not None else ():
                assert getattr(got, field_) == getattr(expected, field_), f"{name}.{role}.{field_}"
    for name, (sparsity, n, m) in want.pruned.items():
        zeros = model.get_submodule(name).weight == 0
        reached = zeros.double().mean().item()
        assert reached >= sparsity - 0.02, f"{name}: {reached:.3f} zeros, asked {sparsity}"
        assert name in schemes or reached <= sparsity + 0.02, f"{name}: {reached:.3f} zeros"
        if n:
            groups = zeros.reshape(zeros.shape[0], -1, m).sum(dim=-1)
            assert bool((groups >= n).all()), f"{name}: breaks the {n}:{m} mask"
    for name, module in model.named_modules():  # smoothing changes norms, not these
        if isinstance(module, nn.Linear | nn.Embedding) and name not in {**schemes, **want.pruned}:
            assert torch.equal(module.weight, before[f"{name}.weight"]), f"{name} changed"
    attention = {n: m for n, m in model.named_modules() if type(m).__name__.endswith("Attention")}
    for name, module in attention.items():
        got = getattr(module, "attention_scheme", None)
        assert (got is None) == (want.kv_cache is None), f"{name}: KV cache not as asked"
        for field_ in ARGUMENTS if got is not None else ():
            assert getattr(got.keys_values, field_) == getattr(want.kv_cache, field_)


def test_corpus_holds_all_34_reference_recipes_and_refusals_name_only_those() -> None:
    assert len(RECIPES) == 34
    assert set(REFUSED) <= set(RECIPES)


def test_the_check_refuses_a_model_the_recipe_left_uncompressed() -> None:
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(AssertionError, match="other layers quantized than asked"):
        check_compressed_as_asked(model, before, "tests/e2e/recipes/FP8/recipe_fp8_dynamic.yaml")


def test_the_check_refuses_half_zeros_that_break_the_2_4_mask() -> None:
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight[:, : module.in_features // 2] = 0  # half zeros, whole groups dense
    path = "tests/llmcompressor/transformers/compression/recipes/sparse_24.yaml"
    with pytest.raises(AssertionError, match="breaks the 2:4 mask"):
        check_compressed_as_asked(model, before, path)


@pytest.mark.parametrize("path", corpus())
def test_reference_recipe_compresses_the_tiny_llama(path: str) -> None:
    model = tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    try:
        oneshot(
            model,
            str(ROOT / path),
            token_ids(),
            num_calibration_samples=8,
            trainer_kwargs=QUIET,
            progress=False,
        )
    except ValueError as error:
        if path in REFUSED:
            assert REFUSED[path] in str(error).splitlines()[0], "refused for another reason"
        raise
    check_compressed_as_asked(model, before, path)
