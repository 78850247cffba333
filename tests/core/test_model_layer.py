"""Target resolution: class names, module names, regexes, ignore, and errors."""

from __future__ import annotations

import pytest
from torch import nn

from lightning_compress.core import ModelParameterizedLayer, get_layers_params, match_named_modules
from lightning_compress.core.model_layer import module_matches


@pytest.mark.parametrize(
    ("targets", "ignore", "expected"),
    [
        ("Linear", None, ["fc1", "fc2"]),
        (["fc2"], None, ["fc2"]),
        ("re:fc\\d", None, ["fc1", "fc2"]),
        ("Linear", ["fc1"], ["fc2"]),
        ("Linear", "re:.*2$", ["fc1"]),
        (["ReLU", "fc1"], None, ["fc1", "act"]),
    ],
)
def test_match_named_modules(model, targets, ignore, expected):
    assert list(match_named_modules(model, targets, ignore)) == sorted(
        expected, key=["fc1", "act", "fc2"].index
    )


def test_targets_matching_nothing_name_the_target_and_suggest(model):
    with pytest.raises(ValueError, match=r"\['Conv2d'\] match no module.*Linear.*fc1"):
        match_named_modules(model, ["Linear", "Conv2d"])


def test_require_all_false_allows_partial_matches(model):
    assert list(match_named_modules(model, ["Linear", "Conv2d"], require_all=False)) == [
        "fc1",
        "fc2",
    ]


@pytest.mark.parametrize("bad", ["re:(", "", 3])
def test_malformed_patterns(model, bad):
    with pytest.raises(ValueError, match="targets/ignore"):
        match_named_modules(model, ["Linear", bad])


def test_get_layers_params(model):
    found = get_layers_params("Linear", model)
    assert list(found) == ["fc1.weight", "fc2.weight"]
    entry = found["fc1.weight"]
    assert isinstance(entry, ModelParameterizedLayer)
    assert entry.layer is model.fc1 and entry.param is model.fc1.weight
    assert (entry.layer_name, entry.param_name) == ("fc1", "weight")
    assert list(get_layers_params("fc2", model, param_name="bias")) == ["fc2.bias"]


def test_get_layers_params_rejects_layers_without_the_parameter(model):
    with pytest.raises(ValueError, match="'act' \\(ReLU\\) has no parameter 'weight'"):
        get_layers_params(["ReLU"], model)


def test_nested_names():
    outer = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2))
    assert list(match_named_modules(outer, "re:0\\.")) == ["0.0"]


class _SubclassedLinear(nn.Linear):
    """A subclass of ``nn.Linear`` (as Falcon's ``FalconLinear``)."""


def _with_subclassed_linear() -> nn.Sequential:
    return nn.Sequential(_SubclassedLinear(2, 2), nn.ReLU(), nn.Linear(2, 2))


def test_a_class_target_selects_subclasses():
    assert list(match_named_modules(_with_subclassed_linear(), "Linear")) == ["0", "2"]


def test_a_subclass_target_selects_only_the_subclass():
    assert list(match_named_modules(_with_subclassed_linear(), "_SubclassedLinear")) == ["0"]


def test_ignoring_a_base_class_ignores_its_subclasses():
    model = _with_subclassed_linear()
    assert list(match_named_modules(model, ["Linear", "ReLU"], ignore="Linear")) == ["1"]


def test_class_matching_agrees_with_compressed_tensors():
    from compressed_tensors.utils.match import is_match

    model = _with_subclassed_linear()
    for target in ["Linear", "_SubclassedLinear", "ReLU", "Module", "Sequential"]:
        for name, module in model.named_modules():
            if name:
                assert module_matches(name, module, target) == is_match(name, module, target)


def test_a_module_name_selects_that_module_inside_a_wrapper():
    """A LightningModule holding the model as ``model``: ``lm_head`` is ``model.lm_head``."""
    wrapper = nn.Module()
    wrapper.model = nn.Module()
    wrapper.model.body = nn.Linear(2, 2)
    wrapper.model.lm_head = nn.Linear(2, 2)
    wrapper.model.xlm_head = nn.Linear(2, 2)
    assert list(match_named_modules(wrapper, "Linear", ["lm_head"])) == [
        "model.body",
        "model.xlm_head",
    ]
    assert list(match_named_modules(wrapper, ["model.lm_head"])) == ["model.lm_head"]
