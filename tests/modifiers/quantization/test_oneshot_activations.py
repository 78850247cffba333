"""One-shot QuantizationModifier with activation quantization, driven by calibration events."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_compress.bundled.model import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.args import (
    QuantizationArgs,
    QuantizationScheme,
    preset_scheme,
)
from lightning_compress.modifiers.quantization.observers import observer_for, qparams_for_weight
from lightning_compress.modifiers.quantization.ops import (
    calculate_qparams,
    compute_dynamic_qparams,
    fake_quantize,
)
from lightning_compress.modifiers.quantization.runtime import InputQuantizer, remove_quantization
from lightning_compress.recipe import RecipeError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture
def model() -> Stack:
    torch.manual_seed(0)
    return Stack()


def batches(n: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(2, 5, 64, generator=generator) for _ in range(n)]


def start(model: nn.Module, modifier: QuantizationModifier) -> CompressionSession:
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    return session


def calibrate_sequentially(model: Stack, modifier: QuantizationModifier) -> None:
    """Calibrates block by block, each block on the outputs of the quantized blocks before."""
    session = start(model, modifier)
    hidden = batches()
    with torch.no_grad():
        for block in model.blocks:
            for h in hidden:
                block(h)
            session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=block)
            hidden = [block(h) for h in hidden]
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()


class ReferenceLinear:
    """A linear layer quantized with ops.py: weights once, inputs static or dynamic."""

    def __init__(self, layer: nn.Linear, scheme: QuantizationScheme, inputs: list) -> None:
        weight = layer.weight.detach()
        self.weight = fake_quantize(
            weight, *qparams_for_weight(weight, scheme.weights), scheme.weights
        )
        self.bias, self.args = layer.bias, scheme.input_activations
        if not self.args.dynamic:
            low = torch.stack([x.min() for x in inputs]).min()
            high = torch.stack([x.max() for x in inputs]).max()
            self.qparams = calculate_qparams(low, high, self.args)

    def __call__(self, x: torch.Tensor, quantize_input: bool = True) -> torch.Tensor:
        if quantize_input:
            qparams = compute_dynamic_qparams(x, self.args) if self.args.dynamic else self.qparams
            x = fake_quantize(x, *qparams, self.args)
        return F.linear(x, self.weight, self.bias)


def reference_block(block: Block, scheme: QuantizationScheme, hidden: list) -> Callable:
    """Returns ``block`` made of ReferenceLinears, calibrated unquantized on ``hidden``; its
    ``quantize_inputs=False`` runs the quantized weights on unquantized inputs."""
    up = ReferenceLinear(block.up, scheme, hidden)
    down = ReferenceLinear(block.down, scheme, [F.relu(block.up(h)) for h in hidden])
    return lambda x, quantize_inputs=True: x + down(F.relu(up(x, quantize_inputs)), quantize_inputs)


@pytest.mark.parametrize("preset", ["W8A8", "FP8", "FP8_DYNAMIC"])
def test_sequential_calibration_matches_an_ops_reference(model, preset):
    scheme = preset_scheme(preset, ["Linear"])
    with torch.no_grad():
        hidden, reference = batches(), []
        for block in model.blocks:
            reference.append(reference_block(block, scheme, hidden))
            hidden = [reference[-1](h) for h in hidden]

    calibrate_sequentially(model, QuantizationModifier(scheme=preset))

    x = torch.randn(3, 4, 64)
    expected = reference[1](reference[0](x))
    assert torch.equal(model(x), expected)


def reference_model(model: Stack, scheme: QuantizationScheme, quantized: bool) -> Callable:
    """The ops reference of ``model`` calibrated block by block, each block on the outputs of
    the blocks before run with quantized weights, and quantized inputs if ``quantized``."""
    with torch.no_grad():
        hidden, blocks = batches(), []
        for block in model.blocks:
            blocks.append(reference_block(block, scheme, hidden))
            hidden = [blocks[-1](h, quantized) for h in hidden]
    return lambda x: blocks[1](blocks[0](x))


@pytest.mark.parametrize("preset", ["W8A8", "FP8"])
def test_float_activations_in_calibration_calibrate_on_quantized_weights_only(model, preset):
    scheme = preset_scheme(preset, ["Linear"])
    expected = reference_model(model, scheme, quantized=False)
    quantized_calibration = reference_model(model, scheme, quantized=True)
    modifier = QuantizationModifier(scheme=preset, quantize_activations_in_calibration=False)

    calibrate_sequentially(model, modifier)

    x = torch.randn(3, 4, 64)
    assert torch.equal(model(x), expected(x))  # inputs quantized once calibration ended
    if preset == "FP8":  # static inputs: block 1's input scales differ between the two
        assert not torch.equal(model(x), quantized_calibration(x))


def test_float_activations_in_calibration_attach_the_input_quantizer_at_the_end(model):
    modifier = QuantizationModifier(scheme="FP8", quantize_activations_in_calibration=False)
    session = start(model, modifier)
    for h in batches():
        model(h)
    session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    layer = model.blocks[0].up
    assert hasattr(layer, "input_scale") and not layer._forward_pre_hooks
    assert not hasattr(layer, "quantization_scheme")
    session.event(EventType.CALIBRATION_EPOCH_END)
    for layer in (model.blocks[0].up, model.blocks[1].down):
        hooks = list(layer._forward_pre_hooks.values())
        assert len(hooks) == 1 and isinstance(hooks[0], InputQuantizer)
        assert layer.quantization_scheme.input_activations.type == "float"


def test_float_activations_in_calibration_refused_for_training():
    with pytest.raises(RecipeError, match=r"quantize_activations_in_calibration: expected true"):
        QuantizationModifier(scheme="FP8", start=0, quantize_activations_in_calibration=False)


def test_each_sequential_epoch_end_quantizes_its_block_only(model):
    session = start(model, QuantizationModifier(scheme="FP8"))
    for h in batches():
        model(h)
    session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    assert hasattr(model.blocks[0].up, "input_scale") and hasattr(
        model.blocks[0].down, "input_scale"
    )
    assert not hasattr(model.blocks[1].up, "input_scale")
    hooks = model.blocks[1].up._forward_pre_hooks.values()
    assert not any(isinstance(hook, InputQuantizer) for hook in hooks)
    session.event(EventType.CALIBRATION_EPOCH_END)
    assert hasattr(model.blocks[1].up, "input_scale")


def test_whole_model_pass_observes_unquantized_activations(model):
    inputs: dict[str, list] = {}
    reference = copy.deepcopy(model)
    for name, layer in reference.named_modules():
        if isinstance(layer, nn.Linear):
            layer.register_forward_pre_hook(
                lambda m, a, n=name: inputs.setdefault(n, []).append(a[0])
            )
    session = start(model, QuantizationModifier(scheme="FP8"))
    with torch.no_grad():
        for h in batches():
            model(h)
            reference(h)
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()
    args = preset_scheme("FP8", ["Linear"]).input_activations
    for name, seen in inputs.items():
        low, high = torch.cat(seen).min(), torch.cat(seen).max()
        assert torch.equal(
            model.get_submodule(name).input_scale, calculate_qparams(low, high, args)[0]
        )


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "mse"])
def test_static_input_observers_of_config_groups(observer):
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 32))
    inputs = {"num_bits": 8, "symmetric": False, "observer": observer, "averaging_constant": 0.5}
    groups = {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}, "input_activations": inputs}}
    session = start(layer, QuantizationModifier(config_groups=groups))
    reference = observer_for(QuantizationArgs(**inputs))
    for h in batches():
        layer(h)
        reference.update(h)
    session.event(EventType.CALIBRATION_EPOCH_END)
    scale, zero_point = reference.get_qparams()
    assert torch.equal(layer[0].input_scale, scale)
    assert torch.equal(layer[0].input_zero_point, zero_point)
    assert layer[0].weight_scale.shape == (1,)


def test_activation_hooks_survive_finalize_until_remove_quantization(model):
    modifier = QuantizationModifier(scheme="W8A8")
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model)
    session.finalize()  # data-free: weights and dynamic activations need no calibration
    (built,) = session.lifecycle.recipe.modifiers
    assert built.num_hooks == 0
    x = torch.randn(2, 3, 64)
    quantized = model(x)
    layer = model.blocks[0].up
    assert layer.quantization_scheme.input_activations.strategy == "token"
    assert torch.equal(copy.deepcopy(model)(x), quantized)
    assert torch.equal(pickle.loads(pickle.dumps(model))(x), quantized)

    baked = copy.deepcopy(model)
    names = remove_quantization(baked)
    assert names == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert not any(baked.blocks[0].up._forward_pre_hooks.values())
    assert sorted(baked.state_dict()) == sorted(Stack().state_dict())
    assert not torch.equal(baked(x), quantized)  # the weights stay quantized, inputs do not
    plain_inputs = Stack()
    plain_inputs.load_state_dict(baked.state_dict())
    assert torch.equal(baked(x), plain_inputs(x))


def test_static_activations_without_calibration_data_fail_and_leave_the_model(model):
    before = {key: value.clone() for key, value in model.state_dict().items()}
    session = CompressionSession()
    session.initialize(recipe=QuantizationModifier(scheme="FP8"), model=model)
    with pytest.raises(RecipeError, match=r"layer 'blocks.0.up'.*needs calibration data"):
        session.finalize()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert not any(layer._forward_pre_hooks for layer in model.modules())


def test_a_subgraph_with_an_uncalibrated_layer_is_left_unchanged(model):
    session = start(model, QuantizationModifier(scheme="FP8"))
    model.blocks[0].up(batches()[0])  # `down` sees nothing
    before = copy.deepcopy(model.blocks[0].state_dict())
    with pytest.raises(RecipeError, match="'blocks.0.down'.*calibration data"):
        session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    assert list(model.blocks[0].state_dict()) == list(before)
    assert torch.equal(model.blocks[0].up.weight, before["up.weight"])


@pytest.mark.parametrize("quantized", [True, False])
def test_abort_keeps_finished_layers_quantized_and_removes_the_observers(model, quantized):
    modifier = QuantizationModifier(scheme="FP8", quantize_activations_in_calibration=quantized)
    session = start(model, modifier)
    for h in batches():
        model(h)
    session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    session.lifecycle.abort()
    for layer in model.blocks[0].modules():  # finished: consistently quantized
        if isinstance(layer, nn.Linear):
            assert hasattr(layer, "quantization_scheme") and hasattr(layer, "input_scale")
            hooks = list(layer._forward_pre_hooks.values())
            assert len(hooks) == 1 and isinstance(hooks[0], InputQuantizer)
    for layer in model.blocks[1].modules():  # pending: as before the calibration
        assert not hasattr(layer, "quantization_scheme") and not hasattr(layer, "input_scale")
        assert not layer._forward_pre_hooks
    model(batches()[0])


def test_non_finite_activations_name_the_layer(model):
    start(model, QuantizationModifier(scheme="FP8"))
    bad = batches()[0]
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="'blocks.0.up' received NaN or Inf"):
        model(bad)


def test_tiny_decoder_w8a8_block_by_block():
    torch.manual_seed(0)
    config = TinyDecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, max_seq_len=16)
    decoder = TinyDecoder(config)
    tokens = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        plain = decoder(tokens)
    session = start(decoder, QuantizationModifier(scheme="W8A8", ignore=["lm_head"]))
    with torch.no_grad():
        decoder(tokens)
        for layer in decoder.model.layers:
            session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=layer)
    session.event(EventType.CALIBRATION_EPOCH_END)
    session.finalize()
    with torch.no_grad():
        quantized = decoder(tokens)
    assert torch.isfinite(quantized).all() and not torch.equal(quantized, plain)
    assert (quantized - plain).abs().mean() < 0.1 * plain.abs().mean()
    assert not hasattr(decoder.lm_head, "quantization_scheme")
    assert decoder.model.layers[1].mlp.down_proj.weight_scale.shape == (64, 1)
