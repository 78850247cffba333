"""Misspelled modifier names, settings, preset schemes and scheme keys are refused with the
closest valid names suggested, after the message's usual list of valid names."""

from __future__ import annotations

import dataclasses
import random
import re
import string

import pytest

from lightning_compress.modifiers import GPTQModifier, QuantizationModifier
from lightning_compress.modifiers.quantization import PRESET_SCHEMES, QuantizationArgs
from lightning_compress.recipe import Recipe, RecipeError, get_modifier_class
from lightning_compress.recipe.errors import did_you_mean

BUILTIN_MODIFIERS = [
    "AWQModifier",
    "ConstantPruningModifier",
    "GPTQModifier",
    "MagnitudePruningModifier",
    "OutputDistillationModifier",
    "QuantizationModifier",
    "SmoothQuantModifier",
    "SparseGPTModifier",
    "WandaPruningModifier",
]


def _suggested(message: str) -> list[str]:
    """The names a message's "did you mean" hint suggests (empty when it has none)."""
    match = re.search(r"; did you mean (.+)\?$", message)
    return re.findall(r"'([^']+)'", match.group(1)) if match else []


def _misspell(name: str, rng: random.Random) -> str:
    """``name`` with one random typo: a letter dropped, doubled, replaced or two swapped."""
    i = rng.randrange(len(name) - 1)
    kind = rng.choice(["drop", "double", "replace", "swap"])
    if kind == "drop":
        return name[:i] + name[i + 1 :]
    if kind == "double":
        return name[:i] + name[i] + name[i:]
    if kind == "replace":
        letters = string.ascii_lowercase if name[i].islower() else string.ascii_uppercase
        return name[:i] + rng.choice(letters.replace(name[i], "")) + name[i + 1 :]
    return name[:i] + name[i + 1] + name[i] + name[i + 2 :]


def _recipe_error(text: str) -> str:
    with pytest.raises(RecipeError) as error:
        Recipe.create_instance(text)
    return str(error.value)


def test_a_misspelled_modifier_name_suggests_the_registered_one():
    message = _recipe_error("quant_modifiers: {GPTQModifer: {scheme: W4A16}}")
    assert message.startswith(
        "stage 'default_stage', group 'quant_modifiers': unknown modifier 'GPTQModifer'; "
        "registered modifiers: "
    )
    assert _suggested(message)[0] == "GPTQModifier"


def test_a_misspelled_setting_suggests_the_valid_one():
    message = _recipe_error(
        "quant_modifiers: {GPTQModifier: {scheme: W4A16, dampening_fraction: 0.1}}"
    )
    assert "GPTQModifier: unknown setting(s) ['dampening_fraction']; valid settings: [" in message
    assert _suggested(message) == ["dampening_frac"]


def test_a_misspelled_preset_scheme_suggests_presets_in_any_case():
    for scheme in ("W4A61", "w4a61"):
        message = _recipe_error(f"quant_modifiers: {{GPTQModifier: {{scheme: {scheme}}}}}")
        assert f"GPTQModifier.scheme: unknown preset scheme '{scheme}'; presets are [" in message
        assert "W4A16" in _suggested(message)


def test_a_misspelled_quantization_args_key_suggests_the_valid_one():
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bit": 4}}}
    with pytest.raises(RecipeError, match=r"config_groups\.g\.weights: unknown key\(s\)") as error:
        QuantizationModifier(config_groups=groups)
    assert _suggested(str(error.value)) == ["num_bits"]


def test_several_misspelled_settings_each_get_their_closest_name():
    with pytest.raises(RecipeError) as error:
        GPTQModifier(scheme="W4A16", targts=["Linear"], blok_size=64)
    assert str(error.value).endswith(
        "; did you mean 'targets' for 'targts', 'block_size' for 'blok_size'?"
    )


def test_a_name_close_to_nothing_gets_no_hint():
    with pytest.raises(RecipeError, match=r"unknown setting\(s\) \['xyzzy'\]") as error:
        GPTQModifier(scheme="W4A16", xyzzy=1)
    assert "did you mean" not in str(error.value)
    assert did_you_mean(["xyzzy"], ["targets", "ignore"]) == ""


# Fault cases: random one-letter typos (fixed seed) of every valid name suggest that name.


def _typos(names: list[str], seed: int, per_name: int = 3) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    cases = []
    for name in names:
        for _ in range(per_name):
            typo = _misspell(name, rng)
            if typo.upper() not in {valid.upper() for valid in names}:
                cases.append((name, typo))
    return cases


@pytest.mark.parametrize(("name", "typo"), _typos(BUILTIN_MODIFIERS, seed=0))
def test_random_typos_of_modifier_names_suggest_the_name(name, typo):
    with pytest.raises(RecipeError, match=f"unknown modifier '{re.escape(typo)}'") as error:
        get_modifier_class(typo)
    assert name in _suggested(str(error.value))


@pytest.mark.parametrize("modifier", BUILTIN_MODIFIERS)
def test_random_typos_of_settings_suggest_the_setting(modifier):
    cls = get_modifier_class(modifier)
    settings = [field.name for field in dataclasses.fields(cls)]
    for name, typo in _typos(settings, seed=1):
        with pytest.raises(RecipeError, match=re.escape(f"unknown setting(s) ['{typo}']")) as error:
            cls(**{typo: None})
        assert name in _suggested(str(error.value)), (typo, str(error.value))


@pytest.mark.parametrize(("name", "typo"), _typos(list(PRESET_SCHEMES), seed=2))
def test_random_typos_of_preset_schemes_suggest_the_preset(name, typo):
    with pytest.raises(RecipeError, match=f"unknown preset scheme '{re.escape(typo)}'") as error:
        QuantizationModifier(scheme=typo)
    assert name in _suggested(str(error.value))


def test_random_typos_of_quantization_args_keys_suggest_the_key():
    keys = [field.name for field in dataclasses.fields(QuantizationArgs)]
    for name, typo in _typos(keys, seed=3):
        with pytest.raises(ValueError, match=re.escape(f"unknown key(s) ['{typo}']")) as error:
            QuantizationArgs.from_dict({typo: 4}, where="weights")
        assert name in _suggested(str(error.value)), (typo, str(error.value))
