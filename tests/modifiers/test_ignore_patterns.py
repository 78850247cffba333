"""``ignore`` entries that match no module: a warning naming them, or an error with ``strict``."""

from __future__ import annotations

import copy
import random
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from export_models import QUIET, tiny_model, token_ids
from helpers import int8_channel_groups
from loguru import logger
from torch import nn

from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import (
    GPTQModifier,
    MagnitudePruningModifier,
    Modifier,
    QuantizationModifier,
    SparseGPTModifier,
)
from lightning_compress.recipe import RecipeError

SEED = 16
MODIFIERS: dict[str, Callable[..., Modifier]] = {
    "rtn": lambda **kw: QuantizationModifier(config_groups=int8_channel_groups(["Linear"]), **kw),
    "gptq": lambda **kw: GPTQModifier(config_groups=int8_channel_groups(["Linear"]), **kw),
    "sparsegpt": lambda **kw: SparseGPTModifier(sparsity=0.5, **kw),
    "magnitude": lambda **kw: MagnitudePruningModifier(final_sparsity=0.5, start=-1, **kw),
}


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    """The library's warnings logged inside the block."""
    messages: list[str] = []
    logger.enable("lightning_compress")
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        yield messages
    finally:
        logger.remove(sink)


def compress(model: nn.Module, modifier: Modifier) -> None:
    oneshot(model, modifier, token_ids(), num_calibration_samples=8, trainer_kwargs=QUIET)


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not hasattr(module, "quantization_scheme")


@pytest.mark.parametrize("kind", MODIFIERS)
def test_an_ignore_entry_matching_nothing_warns_with_the_closest_module(kind):
    model = tiny_model()
    with warnings_logged() as warnings:
        compress(model, MODIFIERS[kind](ignore=["lm_heads", "lm_head"]))
    typo = [w for w in warnings if "ignore: 'lm_heads' matches no module" in w]
    assert len(typo) == 1
    assert "did you mean 'lm_head'" in typo[0] and "strict=True" in typo[0]
    assert not any("'lm_head' matches no module" in w for w in warnings)


@pytest.mark.parametrize("kind", MODIFIERS)
def test_strict_makes_an_ignore_entry_matching_nothing_an_error_before_the_model_changes(kind):
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    modifier = MODIFIERS[kind](ignore=["lm_head", "model.layers.0.mlp.up_projj"], strict=True)
    with pytest.raises(RecipeError) as raised:
        compress(model, modifier)
    message = str(raised.value)
    assert f"{type(modifier).__name__}.ignore: ['model.layers.0.mlp.up_projj']" in message
    assert "strict=True" in message and "did you mean 'model.layers.0.mlp.up_proj'" in message
    assert_unchanged(model, before)


def test_strict_with_every_entry_matching_compresses_all_but_the_ignored():
    model = tiny_model()
    with warnings_logged() as warnings:
        compress(model, MODIFIERS["rtn"](ignore=["lm_head", "re:.*down_proj"], strict=True))
    assert not any("matches no module" in w for w in warnings)
    quantized = {n for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert quantized == {n for n in linears if n != "lm_head" and not n.endswith("down_proj")}


def test_strict_is_read_from_a_yaml_recipe():
    recipe = """
quant_stage:
  quant_modifiers:
    QuantizationModifier:
      config_groups:
        group_0: {targets: [Linear], weights: {num_bits: 8, strategy: channel}}
      ignore: [LM_head]
      strict: true
"""
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=r"QuantizationModifier\.ignore: \['LM_head'\]"):
        compress(model, recipe)
    assert_unchanged(model, before)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_strict_that_is_not_a_bool_is_refused_naming_the_field(value):
    with pytest.raises(RecipeError, match=r"QuantizationModifier\.strict: expected bool"):
        MODIFIERS["rtn"](ignore=["lm_head"], strict=value)


def _misspell(name: str, rng: random.Random) -> str:
    """``name`` with one character dropped, doubled, replaced or swapped with the next."""
    index = rng.randrange(len(name) - 1)
    edits = [
        name[:index] + name[index + 1 :],
        name[:index] + name[index] + name[index:],
        name[:index]
        + rng.choice(string.ascii_lowercase.replace(name[index], ""))
        + name[index + 1 :],
        name[:index] + name[index + 1] + name[index] + name[index + 2 :],
    ]
    return rng.choice([edit for edit in edits if edit != name])


@pytest.mark.parametrize("case", range(6))
def test_random_misspellings_of_a_layer_name_are_refused_with_strict(case):
    rng = random.Random(SEED * 100 + case)
    model = tiny_model()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    modules = {n for n, _ in model.named_modules()} | {type(m).__name__ for m in model.modules()}
    name = rng.choice(names)
    typo = _misspell(name, rng)
    assert typo not in modules
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=rf"ignore: \[{typo!r}\] match no module"):
        compress(model, MODIFIERS[rng.choice(list(MODIFIERS))](ignore=[typo], strict=True))
    assert_unchanged(model, before)
