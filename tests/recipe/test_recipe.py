"""Recipe parsing, stages, args, validation errors and YAML round trips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import RecordingModifier

from lightning_compress.recipe import Recipe, RecipeError, registered_modifiers

RECIPES = sorted((Path(__file__).parents[2] / "configs" / "recipes").glob("*.yaml"))

STAGED = """
args: {first: fc1}
one_stage:
  a_modifiers:
    RecordingModifier: {targets: "${args.first}", start: 1}
two_stage:
  a_modifiers:
    - RecordingModifier: {targets: fc2}
    - RecordingModifier: {targets: [fc1, fc2], end: 4}
"""


def settings(recipe: Recipe) -> list[dict]:
    return [mod.spec() for mod in recipe.modifiers]


def test_yaml_string_with_stages_groups_and_args():
    recipe = Recipe.create_instance(STAGED)
    assert recipe.stage_names == ["one_stage", "two_stage"]
    assert recipe.args == {"first": "fc1"}
    assert settings(recipe) == [
        {"targets": "fc1", "start": 1.0},
        {"targets": "fc2"},
        {"targets": ["fc1", "fc2"], "end": 4.0},
    ]
    assert all(isinstance(mod, RecordingModifier) for mod in recipe.modifiers)


def test_recipe_args_override_args():
    recipe = Recipe.create_instance(STAGED, recipe_args={"first": "fc2"})
    assert recipe.args == {"first": "fc2"}
    assert recipe.modifiers[0].targets == "fc2"


def test_missing_interpolation_names_the_fix():
    text = "a_stage:\n  a_modifiers:\n    RecordingModifier: {targets: '${args.nope}'}\n"
    with pytest.raises(RecipeError, match="recipe_args"):
        Recipe.create_instance(text)
    assert Recipe.create_instance(text, recipe_args={"nope": "fc1"}).modifiers[0].targets == "fc1"


def test_target_stage_selects_stages():
    assert settings(Recipe.create_instance(STAGED, target_stage="two_stage"))[0] == {
        "targets": "fc2"
    }
    assert len(Recipe.create_instance(STAGED, target_stage=["one_stage"]).modifiers) == 1
    with pytest.raises(RecipeError, match=r"\['three_stage'\] not found.*one_stage"):
        Recipe.create_instance(STAGED, target_stage="three_stage")


def test_json_string_dict_and_files(tmp_path):
    data = {"a_stage": {"b_modifiers": {"RecordingModifier": {"targets": "fc1"}}}}
    from_json = Recipe.create_instance(json.dumps(data))
    from_dict = Recipe.create_instance(data)
    json_file = tmp_path / "r.json"
    json_file.write_text(json.dumps(data))
    yaml_file = tmp_path / "r.yaml"
    yaml_file.write_text(from_dict.yaml())
    assert from_json == from_dict == Recipe.create_instance(json_file)
    assert Recipe.create_instance(str(yaml_file)) == from_dict


def test_groups_without_stage_go_to_a_default_stage():
    recipe = Recipe.create_instance("x_modifiers:\n  RecordingModifier: {targets: fc1}\n")
    assert recipe.stage_names == ["default_stage"]


def test_modifier_objects_and_lists():
    one = Recipe.create_instance(RecordingModifier(targets="fc1"))
    many = Recipe.create_instance([RecordingModifier(targets="fc1"), RecordingModifier()])
    assert settings(one) == [{"targets": "fc1"}]
    assert len(many.modifiers) == 2
    named = Recipe.create_instance(RecordingModifier(), modifier_group_name="quant_modifiers")
    assert list(named.stages[0].groups) == ["quant_modifiers"]
    with pytest.raises(RecipeError, match="modifier_group_name"):
        Recipe.create_instance(RecordingModifier(), modifier_group_name="quant")


def test_modifier_objects_are_copied_not_shared():
    given = RecordingModifier(targets="fc1")
    recipe = Recipe.create_instance(given)
    assert recipe.modifiers[0] is not given


def test_recipe_instance_and_lists_of_recipes():
    base = Recipe.create_instance(STAGED)
    assert Recipe.create_instance(base) == base
    combined = Recipe.create_instance(
        [STAGED, "c_stage:\n  a_modifiers:\n    RecordingModifier: {}\n"]
    )
    assert combined.stage_names == ["one_stage", "two_stage", "c_stage"]
    doubled = Recipe.create_instance([base, base])
    assert len(doubled.stage_names) == 4 and len(set(doubled.stage_names)) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a_stage: {a_modifiers: {RecordingModifier: {targets: [fc1}}", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("weird_key: 1\n", r"'weird_key' is not recognised.*_stage"),
        ("a_stage: {oops: {}}\n", r"key 'oops' is not a modifier group"),
        ("a_stage: 3\n", "stage 'a_stage': expected a mapping"),
        ("a_stage: {a_modifiers: 5}\n", r"group 'a_modifiers': expected \{ModifierName"),
        ("a_stage: {a_modifiers: {NoSuchModifier: {}}}\n", r"unknown modifier 'NoSuchModifier'.*"),
        (
            "a_stage: {a_modifiers: {RecordingModifier: {targts: x}}}\n",
            r"stage 'a_stage', group 'a_modifiers', RecordingModifier: unknown setting\(s\) "
            r"\['targts'\]; valid settings: \['targets', 'ignore', 'start', 'end', 'update'",
        ),
        (
            "a_stage: {a_modifiers: {RecordingModifier: {start: soon}}}\n",
            r"RecordingModifier.start: expected float or None, got 'soon'",
        ),
        (
            "a_stage: {a_modifiers: {RecordingModifier: {start: 5, end: 2}}}\n",
            r"RecordingModifier.end: expected an index at or after start=5.0, got 2.0",
        ),
        ("a_stage: {a_modifiers: {RecordingModifier: 7}}\n", "expected a mapping of settings"),
        ("args: [1, 2]\n", "'args': expected a mapping"),
    ],
)
def test_bad_recipes_name_the_problem(text, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.create_instance(text)


def test_unknown_modifier_lists_registered_names():
    with pytest.raises(RecipeError) as info:
        Recipe.create_instance({"x_modifiers": {"Nope": {}}})
    for name in registered_modifiers():
        assert name in str(info.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.create_instance(str(tmp_path / "missing.yaml"))
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.create_instance(tmp_path / "missing")


@pytest.mark.parametrize("bad", [3.5, [], None])
def test_unreadable_inputs(bad):
    with pytest.raises(RecipeError, match="recipe"):
        Recipe.create_instance(bad)


def test_yaml_round_trip_of_python_recipe(tmp_path):
    recipe = Recipe.create_instance(STAGED, recipe_args={"first": "fc2"})
    path = tmp_path / "out.yaml"
    text = recipe.yaml(path)
    assert path.read_text() == text
    assert Recipe.create_instance(text) == recipe
    assert Recipe.create_instance(path) == recipe


def test_shipped_recipes_exist():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_round_trip(path):
    recipe = Recipe.create_instance(path)
    assert recipe.modifiers
    again = Recipe.create_instance(recipe.yaml())
    assert again == recipe
    assert again.yaml() == recipe.yaml()


def test_unquoted_n_m_patterns_stay_text():
    text = "x_modifiers:\n  RecordingModifier: {targets: fc1}\nargs: {pattern: 2:4, n: 12}\n"
    assert Recipe.create_instance(text).args == {"pattern": "2:4", "n": 12}
