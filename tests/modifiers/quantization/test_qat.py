"""Quantization-aware training with QuantizationModifier, against the shared ops.py math."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs, preset_scheme
from lightning_compress.modifiers.quantization.observers import qparams_and_global_scale
from lightning_compress.modifiers.quantization.ops import (
    calculate_qparams,
    compute_dynamic_qparams,
    fake_quantize,
    quant_range,
    reduce_min_max,
    strategy_groups,
)
from lightning_compress.modifiers.quantization.runtime import InputQuantizer
from lightning_compress.recipe import RecipeError

STATIC_MOVING_AVERAGE = {
    "g": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "strategy": "channel"},
        "input_activations": {"num_bits": 8, "observer": "moving_average"},
    }
}


def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))


def batch(step: int) -> torch.Tensor:
    return torch.randn(4, 8, 128, generator=torch.Generator().manual_seed(100 + step))


class Run:
    """A model, an optimizer and a session, stepped through the training events by hand."""

    def __init__(self, model: nn.Module, modifier: QuantizationModifier, **session_kw) -> None:
        self.model = model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        self.session = CompressionSession()
        self.session.initialize(recipe=modifier, model=model, **session_kw)

    def step(self, step: int) -> None:
        event = self.session.event
        event(EventType.BATCH_START, global_step=step, global_batch=step)
        loss = self.model(batch(step)).square().mean()
        event(EventType.LOSS_CALCULATED, loss=loss)
        loss.backward()
        event(EventType.OPTIM_PRE_STEP)
        self.optimizer.step()
        self.optimizer.zero_grad()
        event(EventType.OPTIM_POST_STEP)
        event(EventType.BATCH_END)

    def steps(self, first: int, last: int) -> None:
        for step in range(first, last):
            self.step(step)


def reference_linear(layer: nn.Linear, x: torch.Tensor, scheme, observed=None) -> torch.Tensor:
    """``layer`` on ``x`` with weights fake-quantized as one-shot round-to-nearest does and
    inputs by ops.py directly."""
    weight = layer.parametrizations.weight.original
    scale, zero_point, tensor_scale = qparams_and_global_scale(weight, scheme.weights)
    w_hat = fake_quantize(weight, scale, zero_point, scheme.weights, tensor_scale)
    inputs = scheme.input_activations
    if inputs is not None:
        qparams = (
            compute_dynamic_qparams(x, inputs)
            if inputs.dynamic
            else calculate_qparams(*reduce_min_max(observed, inputs), inputs)
        )
        x = fake_quantize(x, *qparams, inputs)
    return F.linear(x, w_hat, layer.bias)


@pytest.mark.parametrize(
    "preset",
    [
        *("W8A8", "W4A8", "W4A16", "W4A16_ASYM", "W8A16", "FP8", "FP8_DYNAMIC"),
        *("MXFP4A16", "FP8_BLOCK", "NVFP4A16"),
    ],
)
def test_fake_quant_forward_equals_ops_reference(preset):
    model = make_model()
    plain = copy.deepcopy(model)
    run = Run(model, QuantizationModifier(scheme=preset, start=1))
    x = batch(0)
    run.session.event(EventType.BATCH_START, global_step=0)
    assert torch.equal(model(x), plain(x))  # before start: no fake quantization

    run.session.event(EventType.BATCH_END)
    run.session.event(EventType.BATCH_START, global_step=1)
    out = model(x)
    scheme = preset_scheme(preset, ["Linear"])
    hidden = F.relu(reference_linear(model[0], x, scheme, observed=x))
    expected = reference_linear(model[2], hidden, scheme, observed=hidden)
    assert torch.equal(out, expected)
    assert not torch.equal(out, plain(x))


@pytest.mark.parametrize("preset", ["W8A8", "FP8"])
def test_gradients_are_straight_through(preset):
    model = make_model()
    Run(model, QuantizationModifier(scheme=preset, start=0)).session.event(
        EventType.BATCH_START, global_step=0
    )
    layer, scheme = model[0], preset_scheme(preset, ["Linear"])
    x = batch(0).requires_grad_(True)
    grad_out = torch.randn(4, 8, 128)
    layer(x).backward(grad_out)

    weight = layer.parametrizations.weight.original
    w_args, x_args = scheme.weights, scheme.input_activations
    w_qparams = compute_dynamic_qparams(weight, w_args)
    x_qparams = compute_dynamic_qparams(x, x_args)  # static: min-max of the first batch, the same
    w_hat, x_hat = fake_quantize(weight, *w_qparams, w_args), fake_quantize(x, *x_qparams, x_args)
    expected_w = (grad_out.flatten(0, 1).T @ x_hat.flatten(0, 1)) * inside(
        weight, w_qparams, w_args
    )
    expected_x = (grad_out @ w_hat) * inside(x, x_qparams, x_args)
    torch.testing.assert_close(weight.grad, expected_w)
    torch.testing.assert_close(x.grad, expected_x)
    if preset == "W8A8":  # a row's positive maximum lands at 127.5 and clamps to 127
        assert 0 < inside(weight, w_qparams, w_args).mean() < 1


def inside(x: torch.Tensor, qparams, args: QuantizationArgs) -> torch.Tensor:
    """1 where ``x / scale + zero_point`` is inside the quantized range, else 0."""
    scale, zero_point = qparams
    scaled = strategy_groups(x.detach(), args) / scale.unsqueeze(-1)
    scaled = scaled + zero_point.float().unsqueeze(-1)
    qmin, qmax = quant_range(args)
    return ((scaled >= qmin) & (scaled <= qmax)).reshape(x.shape).float()


@pytest.mark.parametrize(
    ("start", "freeze", "steps_per_epoch", "frozen_from"),
    [(1, 3, None, 3), (0.5, 1.5, 2, 3), (1, 2, 1, 2)],
)
def test_observers_freeze_at_the_index(start, freeze, steps_per_epoch, frozen_from):
    model = make_model()
    modifier = QuantizationModifier(
        config_groups=STATIC_MOVING_AVERAGE, start=start, freeze_observers=freeze
    )
    run = Run(model, modifier, steps_per_epoch=steps_per_epoch)
    history = []
    for step in range(6):
        run.step(step)
        history.append({k: v.clone() for k, v in model[0].state_dict().items() if "scale" in k})
    for step in range(1, 6):
        changed = [not torch.equal(history[step][k], history[step - 1][k]) for k in history[step]]
        assert changed == [step < frozen_from] * 2, (step, changed)


def test_moving_average_observer_follows_the_formula():
    model = make_model()
    config = copy.deepcopy(STATIC_MOVING_AVERAGE)
    config["g"]["input_activations"]["averaging_constant"] = 0.25
    run = Run(model, QuantizationModifier(config_groups=config, start=0))
    run.session.event(EventType.BATCH_START, global_step=0)
    first, second = batch(0), batch(1)
    model(first)
    model(second)
    args = QuantizationArgs(num_bits=8, observer="moving_average", averaging_constant=0.25)
    (min1, max1), (min2, max2) = reduce_min_max(first, args), reduce_min_max(second, args)
    expected = calculate_qparams(min1.lerp(min2, 0.25), max1.lerp(max2, 0.25), args)
    assert torch.equal(model[0].input_scale, expected[0])
    model.eval()
    model(batch(2))  # eval forwards are not observed
    assert torch.equal(model[0].input_scale, expected[0])


@pytest.mark.parametrize("recipe", [{"scheme": "W8A8"}, {"config_groups": STATIC_MOVING_AVERAGE}])
def test_resume_from_a_state_dict_is_exact(recipe):
    def modifier() -> QuantizationModifier:
        return QuantizationModifier(**recipe, start=2, freeze_observers=5)

    uninterrupted = Run(make_model(), modifier())
    uninterrupted.steps(0, 8)

    first_half = Run(make_model(), modifier())
    first_half.steps(0, 4)
    resumed = Run(make_model(seed=1), modifier())  # a fresh set-up, as Lightning's setup makes it
    resumed.model.load_state_dict(first_half.model.state_dict(), strict=True)
    resumed.optimizer.load_state_dict(first_half.optimizer.state_dict())
    resumed.steps(4, 8)

    x = batch(99)
    assert torch.equal(resumed.model(x), uninterrupted.model(x))
    for run in (uninterrupted, resumed):
        run.session.finalize()
    expected = uninterrupted.model.state_dict()
    assert list(resumed.model.state_dict()) == list(expected)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value.float(), expected[key].float()), key
    assert torch.equal(resumed.model(x), uninterrupted.model(x))


def test_finalize_bakes_weights_and_keeps_input_quantization():
    model = make_model()
    run = Run(model, QuantizationModifier(config_groups=STATIC_MOVING_AVERAGE, start=0))
    run.steps(0, 3)
    optimizer_param = model[0].parametrizations.weight.original
    run.session.finalize()

    layer = model[0]
    assert type(layer) is nn.Linear
    assert layer.weight is optimizer_param  # the optimizer still tracks the baked weight
    args = layer.quantization_scheme.weights
    assert torch.equal(
        fake_quantize(layer.weight, layer.weight_scale, layer.weight_zero_point, args),
        layer.weight,
    )
    assert sorted(layer.state_dict()) == sorted(
        ["weight", "bias", "weight_scale", "weight_zero_point", "input_scale", "input_zero_point"]
    )
    assert any(isinstance(h, InputQuantizer) for h in layer._forward_pre_hooks.values())
    x = batch(5)
    x_args = layer.quantization_scheme.input_activations
    x_hat = fake_quantize(x, layer.input_scale, layer.input_zero_point, x_args)
    assert torch.equal(layer(x), F.linear(x_hat, layer.weight, layer.bias))
    assert copy.deepcopy(model)(x).equal(model(x))


def test_buffers_exist_from_initialize_and_are_removed_if_training_never_starts():
    model = make_model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    run = Run(model, QuantizationModifier(config_groups=STATIC_MOVING_AVERAGE, start=10))
    keys = set(model.state_dict())
    assert {"0.weight_scale", "0.input_scale", "0.input_min_vals"} <= keys
    assert "0.parametrizations.weight.original" in keys
    run.optimizer.param_groups[0]["lr"] = 0.0
    run.steps(0, 2)
    run.session.finalize()
    assert type(model[0]) is nn.Linear and not model[0]._forward_pre_hooks
    after = model.state_dict()
    assert sorted(after) == sorted(before)
    assert all(torch.equal(after[key], before[key]) for key in before)


def test_a_failing_recipe_leaves_the_model_unchanged():
    model = make_model()
    before = sorted(model.state_dict())
    recipe = [
        QuantizationModifier(scheme="W8A8", start=0),
        QuantizationModifier(scheme="W8A16", targets=["missing"], start=0),
    ]
    with pytest.raises(RecipeError, match="missing"):
        CompressionSession().initialize(recipe=recipe, model=model)
    assert sorted(model.state_dict()) == before
    assert type(model[0]) is nn.Linear


def test_weights_are_baked_when_end_is_reached():
    model = make_model()
    run = Run(model, QuantizationModifier(config_groups=STATIC_MOVING_AVERAGE, start=1, end=3))
    run.steps(0, 2)
    assert type(model[0]) is not nn.Linear  # still parametrized
    run.step(2)  # BATCH_END after the third optimizer step: global_step == 3 == end
    (built,) = run.session.lifecycle.recipe.modifiers
    assert type(model[0]) is nn.Linear and built.num_hooks == 0
    assert "input_min_vals" not in model[0].state_dict()
    scale = model[0].input_scale.clone()
    run.step(4)  # training goes on with quantized inputs and frozen input qparams
    assert torch.equal(model[0].input_scale, scale)
    assert any(isinstance(h, InputQuantizer) for h in model[0]._forward_pre_hooks.values())
