"""The ``QuantizationArgs`` keys llm-compressor's recipes carry: observer names, ``zp_dtype``,
``actorder`` and ``observer_kwargs``."""

from __future__ import annotations

import pytest
import torch
from loguru import logger
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
from lightning_compress.modifiers.quantization.observers import (
    MemorylessMinMaxObserver,
    MinMaxObserver,
    observer_for,
)
from lightning_compress.recipe import RecipeError


@pytest.mark.parametrize(
    ("name", "kept_as"),
    [("static_minmax", "minmax"), (None, "minmax"), ("memoryless_minmax", "memoryless_minmax")],
)
def test_llm_compressor_observer_names_are_accepted(name, kept_as) -> None:
    assert QuantizationArgs(observer=name).observer == kept_as


def test_imatrix_mse_is_refused_saying_why_and_what_to_use() -> None:
    with pytest.raises(
        ValueError, match=r"^observer='imatrix_mse' is not supported: .*use observer 'mse'"
    ):
        QuantizationArgs(observer="imatrix_mse")


def test_memoryless_minmax_keeps_the_latest_range_and_minmax_the_running_one() -> None:
    args = QuantizationArgs(strategy="tensor")
    running, latest = (
        observer_for(args),
        observer_for(QuantizationArgs(observer="memoryless_minmax")),
    )
    assert isinstance(running, MinMaxObserver) and isinstance(latest, MemorylessMinMaxObserver)
    for observer in (running, latest):
        observer.update(torch.tensor([-4.0, 2.0]))
        observer.update(torch.tensor([-1.0, 1.0]))
    assert (float(running.min_vals), float(running.max_vals)) == (-4.0, 2.0)
    assert (float(latest.min_vals), float(latest.max_vals)) == (-1.0, 1.0)


@pytest.mark.parametrize("zp_dtype", [None, "int8", "torch.float8_e4m3fn", "bfloat16"])
def test_zp_dtype_is_irrelevant_for_symmetric_arguments(zp_dtype) -> None:
    assert QuantizationArgs(num_bits=4, strategy="channel", zp_dtype=zp_dtype).symmetric


def test_asymmetric_zero_points_must_be_kept_in_their_dtype() -> None:
    assert QuantizationArgs(num_bits=4, symmetric=False, zp_dtype="int8").zp_dtype == "int8"
    with pytest.raises(
        ValueError, match=r"^zp_dtype='float8_e4m3fn' is invalid: expected None or 'int8'"
    ):
        QuantizationArgs(num_bits=4, symmetric=False, zp_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match=r"^zp_dtype='int9' is invalid: expected None or the name"):
        QuantizationArgs(zp_dtype="int9")


@pytest.mark.parametrize(
    ("given", "kept_as"),
    [
        (None, None),
        (False, None),
        ("static", "weight"),
        ("weight", "weight"),
        ("group", "group"),
        ("dynamic", "group"),
        (True, "group"),
    ],
)
def test_actorder_spellings_are_kept_canonical(given, kept_as) -> None:
    assert QuantizationArgs(actorder=given).actorder == kept_as


def test_actorder_is_a_weights_setting() -> None:
    with pytest.raises(ValueError, match=r"^actorder='columns' is invalid"):
        QuantizationArgs(actorder="columns")
    inputs = QuantizationArgs(strategy="token", dynamic=True, actorder="weight")
    with pytest.raises(ValueError, match=r"^input_activations.actorder='weight' is invalid"):
        QuantizationScheme(["Linear"], QuantizationArgs(), inputs)


def test_observer_kwargs_the_observer_does_not_use_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match=r"observer 'mse' does not use \['chunk_size'\]"):
        QuantizationArgs(observer="mse", observer_kwargs={"chunk_size": 5})
    with pytest.raises(ValueError, match=r"write observer: moving_average"):
        QuantizationArgs(observer="minmax", observer_kwargs={"averaging_constant": 0.1})
    with pytest.raises(
        ValueError, match=r"^observer_kwargs.grid=\[1, 2\] is invalid: expected a number"
    ):
        QuantizationArgs(observer="mse", observer_kwargs={"grid": [1, 2]})
    with pytest.raises(ValueError, match=r"observer_kwargs.maxshrink=2 is invalid"):
        observer_for(QuantizationArgs(observer="mse", observer_kwargs={"maxshrink": 2}))


def test_averaging_constant_in_observer_kwargs_sets_the_moving_average() -> None:
    args = QuantizationArgs(observer="moving_average", observer_kwargs={"averaging_constant": 0.5})
    assert args.averaging_constant == 0.5
    assert QuantizationArgs.from_dict(args.to_dict()) == args
    assert hash(args) == hash(QuantizationArgs.from_dict(args.to_dict()))


def gptq_groups(actorder: str | None) -> dict:
    weights = {"num_bits": 4, "strategy": "group", "group_size": 16, "actorder": actorder}
    return {"g": {"targets": ["Linear"], "weights": weights}}


@pytest.mark.parametrize(("actorder", "stores_g_idx"), [("group", True), ("weight", False)])
def test_gptq_takes_the_schemes_actorder_when_its_own_is_left_at_its_default(
    actorder, stores_g_idx
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    session = CompressionSession()
    session.initialize(recipe=GPTQModifier(config_groups=gptq_groups(actorder)), model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    with torch.no_grad():
        model(torch.randn(8, 64) * torch.linspace(0.1, 3, 64))
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()
    assert ("weight_g_idx" in model[0]._buffers) == stores_g_idx


def test_gptq_refuses_an_actorder_that_contradicts_the_schemes() -> None:
    with pytest.raises(RecipeError, match=r"actorder: 'weight' conflicts with .*'group'"):
        GPTQModifier(config_groups=gptq_groups("group"), actorder="weight")


def test_round_to_nearest_warns_that_it_ignores_actorder() -> None:
    messages = []
    handler = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        CompressionSession().initialize(
            recipe=QuantizationModifier(config_groups=gptq_groups("weight")),
            model=nn.Sequential(nn.Linear(64, 32)),
        )
    finally:
        logger.remove(handler)
    assert any("actorder='weight'" in m and "ignore it (1 layers, e.g. '0')" in m for m in messages)
