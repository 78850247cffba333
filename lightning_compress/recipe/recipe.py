"""Recipes: stages of modifier groups, parsed from YAML/JSON, files, dicts or modifiers."""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lightning_compress.recipe.errors import RecipeError
from lightning_compress.recipe.registry import get_modifier_class

__all__ = [
    "Recipe",
    "RecipeArgsInput",
    "RecipeInput",
    "RecipeStage",
    "RecipeStageInput",
]

STAGE_SUFFIX = "_stage"
GROUP_SUFFIX = "_modifiers"
DEFAULT_STAGE = "default_stage"
DEFAULT_GROUP = "default_modifiers"
_TOP_LEVEL_KEYS = ("args", "version")

# A recipe as text, path, mapping, Recipe, Modifier, or a list of those.
RecipeInput = Union[str, os.PathLike, dict, "Recipe", Any, list]
RecipeStageInput = str | list[str]
RecipeArgsInput = dict[str, Any]


@dataclass
class RecipeStage:
    """One stage of a recipe: named groups of modifiers.

    Args:
        name: the stage's name (ends with ``_stage``).
        groups: group name (ends with ``_modifiers``) → the group's modifiers, in order.
    """

    name: str
    groups: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def modifiers(self) -> list[Any]:
        """The stage's modifiers, group after group."""
        return [mod for group in self.groups.values() for mod in group]


@dataclass
class Recipe:
    """A compression recipe: ``args`` plus stages of modifier groups.

    Build one with ``Recipe.create_instance``; write it with ``yaml()``.

    Args:
        args: named values the recipe interpolates as ``${args.name}``.
        stages: the stages, in order.
        version: an optional version string, kept for round trips.
    """

    args: dict[str, Any] = field(default_factory=dict)
    stages: list[RecipeStage] = field(default_factory=list)
    version: str | None = None

    @property
    def modifiers(self) -> list[Any]:
        """All modifiers of all stages, in order."""
        return [mod for stage in self.stages for mod in stage.modifiers]

    @property
    def stage_names(self) -> list[str]:
        """The names of the stages, in order."""
        return [stage.name for stage in self.stages]

    @classmethod
    def create_instance(
        cls,
        path_or_modifiers: RecipeInput,
        modifier_group_name: str | None = None,
        target_stage: RecipeStageInput | None = None,
        recipe_args: RecipeArgsInput | None = None,
    ) -> Recipe:
        """Build a recipe with fresh, validated modifiers.

        Args:
            path_or_modifiers: a YAML or JSON string, a path to a ``.yaml``/``.json`` file,
                a dict, a ``Recipe``, a ``Modifier``, or a list of modifiers or recipes.
            modifier_group_name: the group name for modifiers given as objects.
            target_stage: keep only this stage (or these stages); None keeps all.
            recipe_args: values that override the recipe's ``args`` before interpolation.

        Returns:
            The recipe.

        Raises:
            RecipeError: for a missing file, malformed text, an unknown stage, group,
                modifier or key, or an invalid value; the message names the place.
        """
        recipe = _combine(
            [
                _parse_one(item, modifier_group_name or DEFAULT_GROUP, recipe_args)
                for item in _as_sources(path_or_modifiers)
            ]
        )
        return recipe.select_stages(target_stage)

    def select_stages(self, target_stage: RecipeStageInput | None) -> Recipe:
        """The recipe reduced to ``target_stage``.

        Args:
            target_stage: a stage name or list of names; None keeps every stage.

        Returns:
            A recipe with only those stages (``self`` when None).

        Raises:
            RecipeError: if a name is not a stage of this recipe.
        """
        if target_stage is None:
            return self
        wanted = [target_stage] if isinstance(target_stage, str) else list(target_stage)
        unknown = [name for name in wanted if name not in self.stage_names]
        if unknown:
            raise RecipeError(
                f"recipe_stage {unknown} not found; the recipe's stages are {self.stage_names}"
            )
        stages = [stage for stage in self.stages if stage.name in wanted]
        return Recipe(args=dict(self.args), stages=stages, version=self.version)

    def dict(self) -> dict[str, Any]:
        """The recipe as plain data, in the recipe file format.

        Returns:
            ``{"args": ..., "<name>_stage": {"<name>_modifiers": {ClassName: {...}}}}``.
        """
        data: dict[str, Any] = {}
        if self.version is not None:
            data["version"] = self.version
        if self.args:
            data["args"] = dict(self.args)
        for stage in self.stages:
            data[stage.name] = {
                group: _group_dict(modifiers) for group, modifiers in stage.groups.items()
            }
        return data

    def yaml(self, file_path: str | os.PathLike | None = None) -> str:
        """The recipe as YAML text that parses back to an equal recipe.

        Args:
            file_path: also write the text to this file.

        Returns:
            The YAML text.
        """
        text = yaml.safe_dump(self.dict(), sort_keys=False)
        if file_path is not None:
            Path(file_path).write_text(text)
        return text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.dict() == other.dict()

    def modifier_settings(self) -> list[tuple[str, dict[str, Any]]]:
        """What the recipe runs, without its names: each modifier's class and settings.

        Stage, group and argument names do not appear, and defaults are filled in, so a
        recipe written as YAML and the same modifiers given as Python objects agree.

        Returns:
            ``(ClassName, {field: value})`` for every modifier, in order.
        """
        return [(type(mod).__name__, _effective_settings(mod)) for mod in self.modifiers]

    def same_modifiers(self, other: Recipe) -> bool:
        """Whether ``other`` runs the same modifiers, in the same order, with the same settings.

        Args:
            other: the recipe to compare with.

        Returns:
            True when ``modifier_settings()`` of both are equal.
        """
        return self.modifier_settings() == other.modifier_settings()


def _as_sources(path_or_modifiers: RecipeInput) -> list[Any]:
    """Split the input into recipe sources; a list of modifiers is one source."""
    if isinstance(path_or_modifiers, (list, tuple)):
        items = list(path_or_modifiers)
        if not items:
            raise RecipeError("recipe: got an empty list; expected modifiers or recipes")
        if all(_is_modifier(item) for item in items):
            return [items]
        return items
    return [path_or_modifiers]


def _parse_one(source: Any, group_name: str, recipe_args: RecipeArgsInput | None) -> Recipe:
    if isinstance(source, Recipe):
        return _from_mapping(source.dict(), recipe_args)
    if _is_modifier(source):
        source = [source]
    if isinstance(source, list) and all(_is_modifier(item) for item in source):
        _check_group_name(group_name)
        return _from_mapping({DEFAULT_STAGE: {group_name: _group_dict(source)}}, recipe_args)
    if isinstance(source, dict):
        return _from_mapping(source, recipe_args)
    if isinstance(source, (str, os.PathLike)):
        return _from_mapping(_load_text(source), recipe_args)
    raise RecipeError(
        f"recipe: cannot read a {type(source).__name__}; expected a YAML/JSON string, a file "
        f"path, a dict, a Recipe, a Modifier or a list of them"
    )


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 safe loading without base-60 integers, so ``mask_structure: 2:4`` stays text."""


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regex) for tag, regex in resolvers if tag != "tag:yaml.org,2002:int"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0o?[0-7_]+|0b[01_]+)$"),
    list("-+0123456789"),
)


def _load_text(source: str | os.PathLike) -> dict[str, Any]:
    text = str(source)
    path = Path(text) if "\n" not in text and len(text) < 4096 else None
    if path is not None and path.is_file():
        text = path.read_text()
        where = str(path)
    elif path is not None and (path.suffix in (".yaml", ".yml", ".json") or os.sep in text):
        raise RecipeError(f"recipe file '{text}' does not exist")
    else:
        where = "recipe text"
    try:
        data = (
            json.loads(text)
            if text.lstrip().startswith("{")
            else yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
        )
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise RecipeError(f"{where} is not valid YAML/JSON: {err}") from err
    if not isinstance(data, dict):
        raise RecipeError(
            f"{where}: expected a mapping of stages or modifier groups, got "
            f"{type(data).__name__} {data!r:.80}"
        )
    return data


def _from_mapping(data: dict[str, Any], recipe_args: RecipeArgsInput | None) -> Recipe:
    resolved = _resolve_args(data, recipe_args)
    args = resolved.pop("args", None) or {}
    version = resolved.pop("version", None)
    if not isinstance(args, dict):
        raise RecipeError(f"recipe 'args': expected a mapping of names to values, got {args!r}")
    stages: list[RecipeStage] = []
    loose_groups: dict[str, Any] = {}
    for key, value in resolved.items():
        if not isinstance(key, str):
            raise RecipeError(f"recipe key {key!r}: expected a string")
        if key.endswith(STAGE_SUFFIX):
            stages.append(_parse_stage(key, value))
        elif key.endswith(GROUP_SUFFIX):
            loose_groups[key] = value
        else:
            raise RecipeError(
                f"recipe key '{key}' is not recognised; expected 'args', 'version', "
                f"'<name>{STAGE_SUFFIX}' or '<name>{GROUP_SUFFIX}'"
            )
    if loose_groups:
        stages.insert(0, _parse_stage(DEFAULT_STAGE, loose_groups))
    return Recipe(args=args, stages=stages, version=version)


def _resolve_args(data: dict[str, Any], recipe_args: RecipeArgsInput | None) -> dict[str, Any]:
    """Apply ``recipe_args`` over ``args`` and resolve ``${args.name}`` interpolations."""
    if recipe_args and not isinstance(recipe_args, dict):
        raise RecipeError(f"recipe_args: expected a dict of names to values, got {recipe_args!r}")
    try:
        config = OmegaConf.create(data)
        if recipe_args:
            config = OmegaConf.merge(config, {"args": dict(recipe_args)})
        return OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as err:
        raise RecipeError(
            f"recipe interpolation failed: {err.msg if hasattr(err, 'msg') else err}; "
            f"define the value under 'args' or pass it in recipe_args"
        ) from err


def _parse_stage(name: str, value: Any) -> RecipeStage:
    if not isinstance(value, dict) or not value:
        raise RecipeError(
            f"stage '{name}': expected a mapping of '<name>{GROUP_SUFFIX}' groups, got {value!r}"
        )
    groups = {}
    for group, entries in value.items():
        if not str(group).endswith(GROUP_SUFFIX):
            raise RecipeError(
                f"stage '{name}': key '{group}' is not a modifier group; "
                f"expected keys ending in '{GROUP_SUFFIX}'"
            )
        groups[group] = _parse_group(f"stage '{name}', group '{group}'", entries)
    stage = RecipeStage(name=name, groups=groups)
    for modifier in stage.modifiers:
        modifier.join_stage(name, stage.modifiers)
    return stage


def _parse_group(where: str, entries: Any) -> list[Any]:
    if isinstance(entries, dict):
        entries = [{key: value} for key, value in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise RecipeError(f"{where}: expected {{ModifierName: {{settings}}}}, got {entries!r}")
    modifiers = []
    for entry in entries:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{where}: expected {{ModifierName: {{settings}}}}, got {entry!r}")
        ((class_name, kwargs),) = entry.items()
        modifiers.append(_build_modifier(where, class_name, kwargs))
    return modifiers


def _build_modifier(where: str, class_name: str, kwargs: Any) -> Any:
    try:
        modifier_class = get_modifier_class(class_name)
    except RecipeError as err:
        raise RecipeError(f"{where}: {err}") from err
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise RecipeError(f"{where}, {class_name}: expected a mapping of settings, got {kwargs!r}")
    try:
        return modifier_class(**kwargs)
    except RecipeError as err:
        raise RecipeError(f"{where}, {err}") from err


def _group_dict(modifiers: Iterable[Any]) -> dict[str, Any] | list[dict[str, Any]]:
    """A group as ``{ClassName: settings}``, or a list when a class appears twice."""
    entries = [{type(mod).__name__: mod.spec()} for mod in modifiers]
    names = [next(iter(entry)) for entry in entries]
    if len(set(names)) == len(names):
        return {name: entry[name] for entry in entries for name in entry}
    return entries


def _effective_settings(modifier: Any) -> dict[str, Any]:
    """Every setting of ``modifier`` (defaults included), with one spelling per value: a
    single name where a list of names is accepted (``targets: Linear``) becomes a list."""
    hints = typing.get_type_hints(type(modifier))
    settings = {}
    for item in fields(modifier):
        value = getattr(modifier, item.name)
        if isinstance(value, str) and list[str] in typing.get_args(hints[item.name]):
            value = [value]
        settings[item.name] = _plain(value)
    return settings


def _plain(value: Any) -> Any:
    """``value`` with tuples as lists, recursively (YAML has no tuples)."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _combine(recipes: list[Recipe]) -> Recipe:
    if len(recipes) == 1:
        return recipes[0]
    args: dict[str, Any] = {}
    stages: list[RecipeStage] = []
    for recipe in recipes:
        args.update(recipe.args)
        for stage in recipe.stages:
            if stage.name in [existing.name for existing in stages]:
                stage = RecipeStage(
                    name=f"{stage.name[: -len(STAGE_SUFFIX)]}_{len(stages)}{STAGE_SUFFIX}",
                    groups=stage.groups,
                )
            stages.append(stage)
    return Recipe(args=args, stages=stages)


def _check_group_name(name: str) -> None:
    if not name.endswith(GROUP_SUFFIX):
        raise RecipeError(
            f"modifier_group_name '{name}': expected a name ending in '{GROUP_SUFFIX}'"
        )


def _is_modifier(obj: Any) -> bool:
    """Whether ``obj`` is an instance of a registered modifier class."""
    try:
        return isinstance(obj, get_modifier_class(type(obj).__name__))
    except RecipeError:
        return False
