"""GPTQModifier through oneshot(): each layer equals the GPTQ math on the inputs it saw."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from helpers import int8_channel_groups
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress.bundled import (
    TinyDecoder,
    TinyDecoderConfig,
    bundled_text,
    load_bundled_model,
    load_tokenizer,
    token_windows,
)
from lightning_compress.cli import main
from lightning_compress.core import BaseLogger, CompressionSession, EventType, LoggerManager
from lightning_compress.lightning.oneshot import calibration_loader, calibration_samples, oneshot
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier, hessian_collector
from lightning_compress.modifiers.hessian import HessianAccumulator, HessianWorkspace
from lightning_compress.modifiers.hessian_collector import HessianCollector
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.gptq import gptq_quantize, weights_to_keep
from lightning_compress.modifiers.quantization.runtime import InputQuantizer, remove_quantization
from lightning_compress.recipe import RecipeError

CONFIGS = Path(__file__).parents[3] / "configs"
QUIET = {"enable_progress_bar": False}
W4_G32 = QuantizationArgs(num_bits=4, strategy="group", group_size=32)
W4_G32_GROUPS = {"w4": {"targets": ["Linear"], "weights": W4_G32.to_dict()}}


def tiny_decoder() -> TinyDecoder:
    torch.manual_seed(0)
    config = TinyDecoderConfig(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=64,
        max_seq_len=32,
    )
    return TinyDecoder(config).eval()


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return LlamaForCausalLM(config).eval()


def token_ids(n: int = 6, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))


def gptq(**settings: Any) -> GPTQModifier:
    return GPTQModifier(config_groups=W4_G32_GROUPS, ignore=["lm_head"], **settings)


def record_inputs(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each targeted layer's inputs, one per calibration forward.

    Hooks present when a block is calibrated are suspended when the sequential pipeline
    replays the compressed block, so these are exactly the inputs GPTQ accumulated.
    """
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and name != "lm_head":
            layer.register_forward_pre_hook(
                lambda m, args, n=name: inputs.setdefault(n, []).append(args[0].detach().clone())
            )
    return inputs


def reference_hessian(xs: list[torch.Tensor], masks: list | None = None) -> torch.Tensor:
    """``H`` as GPTQModifier forms it: a float64 sum, divided, rounded to float32."""
    accumulator = HessianAccumulator(xs[0].shape[-1], torch.float64)
    for x, mask in zip(xs, masks or [None] * len(xs), strict=True):
        accumulator.add(x, mask)
    return accumulator.hessian().float()


def assert_layers_equal_gptq(
    original: nn.Module,
    compressed: nn.Module,
    inputs: dict[str, list[torch.Tensor]],
    masks: list | None = None,
    actorder: str | None = "static",
    preserve_zeros: bool | str = "auto",
) -> None:
    for name, xs in inputs.items():
        layer = compressed.get_submodule(name)
        weight = original.get_submodule(name).weight.detach()
        keep = weights_to_keep(weight, preserve_zeros)
        hessian = reference_hessian(xs, masks)
        expected = gptq_quantize(weight, hessian, W4_G32, actorder=actorder, keep=keep)
        torch.testing.assert_close(layer.weight, expected.weight_q, rtol=0, atol=1e-6)
        assert torch.equal(layer.weight_scale, expected.scale), name
        if actorder in ("group", "dynamic"):
            assert torch.equal(layer.weight_g_idx, expected.g_idx), name
        else:
            assert not hasattr(layer, "weight_g_idx"), name


def calibrated(model: nn.Module, recipe: Any, dataset: Any, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("num_calibration_samples", None)
    return oneshot(model, recipe, dataset=dataset, trainer_kwargs=QUIET, **kwargs)


# ------------------------------------------------------------ against the math
@pytest.mark.parametrize("actorder", ["static", "weight", "group", "dynamic", "none", None])
def test_each_layer_equals_gptq_on_the_inputs_it_saw(actorder):
    model = tiny_decoder()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    calibrated(model, gptq(actorder=actorder), token_ids())
    assert len(inputs) == 14 and all(len(xs) == 6 for xs in inputs.values())
    assert_layers_equal_gptq(original, model, inputs, actorder=actorder)
    # only the test's own hooks are left
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == len(inputs)


@pytest.mark.parametrize("preserve_zeros", ["auto", True, False])
def test_pruned_layers_keep_their_zeros_and_a_dense_layers_zeros_are_set_free(preserve_zeros):
    model = tiny_decoder()
    attention = model.model.layers[0].self_attn
    with torch.no_grad():  # q_proj pruned 2:4; k_proj, which shares its Hessian, dense
        attention.q_proj.weight.mul_(torch.arange(64) % 4 < 2)
        attention.k_proj.weight[:, ::32] = 0  # 3% accidental zeros
    pruned, dense = attention.q_proj.weight == 0, attention.k_proj.weight == 0
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    calibrated(model, gptq(preserve_zeros=preserve_zeros), token_ids())
    assert_layers_equal_gptq(original, model, inputs, preserve_zeros=preserve_zeros)
    q, k = attention.q_proj.weight[pruned], attention.k_proj.weight[dense]
    assert (q == 0).all() if preserve_zeros is not False else (q != 0).any()
    assert (k == 0).all() if preserve_zeros is True else (k != 0).any()


def test_basic_pipeline_quantizes_every_layer_at_the_end_on_unquantized_inputs():
    model = tiny_decoder()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    calibrated(model, gptq(), token_ids(), pipeline="basic")
    assert_layers_equal_gptq(original, model, inputs)
    with torch.no_grad():  # block 1 saw block 0's full-precision outputs
        plain = record_inputs(original)
        original(token_ids()[:1])
    assert torch.equal(
        inputs["model.layers.1.mlp.down_proj"][0], plain["model.layers.1.mlp.down_proj"][0]
    )


@pytest.mark.parametrize("make_model", [tiny_decoder, tiny_llama], ids=["tiny", "llama"])
def test_padded_tokens_are_left_out_of_the_hessian(make_model):
    model = make_model()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    rows = token_ids(4)
    dataset = [
        {"input_ids": row[:length]} for row, length in zip(rows, (32, 20, 32, 11), strict=True)
    ]
    calibrated(model, gptq(), dataset, batch_size=2)
    loader = calibration_loader(calibration_samples(dataset, None, 32), batch_size=2)
    masks = [batch["attention_mask"] for batch in loader]
    assert_layers_equal_gptq(original, model, inputs, masks)


# ------------------------------------------------------------- shared Hessians
def test_layers_reading_one_input_accumulate_it_once(monkeypatch):
    calls: list[HessianAccumulator] = []  # kept alive, so no two share an id
    add = HessianAccumulator.add

    def counting_add(self, x, mask=None):
        calls.append(self)
        add(self, x, mask)

    monkeypatch.setattr(HessianAccumulator, "add", counting_add)
    calibrated(tiny_decoder(), gptq(), token_ids(3))
    # per block and batch: q/k/v, o, gate/up, down (not 7 layers)
    assert len(calls) == 2 * 3 * 4
    assert len({id(accumulator) for accumulator in calls[:12]}) == 4


def test_a_broken_sharing_pattern_splits_the_hessians():
    x, y, z = (torch.randn(5, 8, generator=torch.Generator().manual_seed(s)) for s in range(3))
    collector = HessianCollector()
    for name, tensor in [("a", x), ("b", x), ("a", y), ("c", y), ("b", z), ("a", z), ("a", z)]:
        collector.observe(name, tensor)
    layers = {name: nn.Linear(8, 2) for name in "abc"}
    hessians = collector.reduced(layers)
    seen = {"a": [x, y, z, z], "b": [x, z], "c": [y]}
    for name, xs in seen.items():
        expected = HessianAccumulator(8, torch.float64)
        for tensor in xs:
            expected.add(tensor)
        torch.testing.assert_close(hessians[name].hessian(), expected.hessian(), rtol=1e-12, atol=0)
    assert collector.num_reads == 4  # {a, b} x, {a, c} y, {b, a} z, {a} z


def test_layers_sharing_a_hessian_can_be_reduced_apart():
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    collector = HessianCollector()
    collector.observe("a", x)
    collector.observe("b", x)
    (a,) = collector.reduced({"a": nn.Linear(8, 2)}).values()
    collector.discard(["a"])
    (b,) = collector.reduced({"b": nn.Linear(8, 2)}).values()
    assert a is not b
    torch.testing.assert_close(a.hessian(), b.hessian(), rtol=1e-12, atol=0)
    assert a.num_samples == b.num_samples == 5


def test_every_solve_makes_its_hessian_in_one_workspace_freed_at_the_end(monkeypatch):
    taken = []
    take = HessianWorkspace.take

    def recording(workspace, size, dtype, device):
        matrix = take(workspace, size, dtype, device)
        taken.append((workspace, size, matrix.data_ptr()))
        return matrix

    monkeypatch.setattr(HessianWorkspace, "take", recording)
    calibrated(tiny_decoder(), gptq(), token_ids())
    # per block: q/k/v, o and gate/up (64 inputs), then down (the MLP's, wider): one call each
    assert [size for _, size, _ in taken] == [64, 64, 64, 128] * 2
    assert len({id(workspace) for workspace, _, _ in taken}) == 1
    assert len({pointer for _, _, pointer in taken[3:]}) == 1  # grown once, then reused
    assert taken[0][0]._buffer is None  # freed when the calibration ended


def test_collectors_share_one_workspace_freed_when_one_is_cleared():
    first, second = HessianCollector(), HessianCollector()
    assert first.workspace is second.workspace  # one buffer for SparseGPT and GPTQ together
    first.workspace.take(8, torch.float32, torch.device("cpu"))
    second.clear()
    assert first.workspace._buffer is None


def test_one_process_reduces_without_copying_the_hessians(monkeypatch):
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    collector = HessianCollector()
    collector.observe("a", x)
    expected = HessianAccumulator(8, torch.float64)
    expected.add(x)

    def no_copy(*args, **kwargs):
        raise AssertionError("one process needs neither a copy of a sum nor a reduction")

    monkeypatch.setattr(HessianAccumulator, "reduce_over_ranks_", no_copy)
    monkeypatch.setattr(hessian_collector, "copy", SimpleNamespace(deepcopy=no_copy))
    (a,) = collector.reduced({"a": nn.Linear(8, 2)}).values()
    assert torch.equal(a.hessian(), expected.hessian())
    assert a.num_samples == 5


# ------------------------------------------------------------------ quality
def test_gptq_beats_rtn_on_the_bundled_model_first_block():
    model = load_bundled_model()
    data = token_windows(bundled_text("calibration"), load_tokenizer(), 128, 8)
    weights = {"num_bits": 4, "strategy": "group", "group_size": 64}
    settings = {
        "config_groups": {"w4": {"targets": [r"re:model\.layers\.0\..*_proj$"], "weights": weights}}
    }
    rtn = calibrated(copy.deepcopy(model), QuantizationModifier(**settings), data)
    with_gptq = calibrated(copy.deepcopy(model), GPTQModifier(**settings), data)
    block = model.model.layers[0]
    inputs = record_inputs(block)
    with torch.no_grad():  # held-out text
        model(token_windows(bundled_text("evaluation"), load_tokenizer(), 128, 4))
    for name, (x,) in inputs.items():
        weight = block.get_submodule(name).weight
        errors = [
            (x @ (compressed.model.layers[0].get_submodule(name).weight - weight).T).square().sum()
            for compressed in (with_gptq, rtn)
        ]
        assert errors[0] < 0.8 * errors[1], name


# ------------------------------------------------------- activation quantization
@pytest.mark.parametrize("scheme", ["W8A8", "FP8"])
def test_activation_quantization_stays_after_finalize(scheme):
    model = tiny_decoder()
    inputs = record_inputs(model)
    calibrated(model, GPTQModifier(scheme=scheme, ignore=["lm_head"]), token_ids(3))
    layer = model.model.layers[1].mlp.up_proj
    assert layer.quantization_scheme.input_activations is not None
    assert any(isinstance(hook, InputQuantizer) for hook in layer._forward_pre_hooks.values())
    if scheme == "FP8":  # static: the calibrated range of the inputs it saw
        high = torch.cat(inputs["model.layers.1.mlp.up_proj"]).abs().max()
        torch.testing.assert_close(layer.input_scale, (high / 448).reshape(1))
    x = token_ids(2)
    with torch.no_grad():
        quantized = model(x)
        remove_quantization(model)
        assert not torch.equal(model(x), quantized)


# ------------------------------------------------------------------- errors
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(), Block()])


GENERATOR = torch.Generator().manual_seed(0)
LOW_RANK = torch.randn(1, 24, 2, generator=GENERATOR) @ torch.randn(2, 64, generator=GENERATOR)


@pytest.mark.parametrize(
    ("x", "settings", "match"),
    [
        (
            LOW_RANK,
            {"dampening_frac": 0.0},
            r"layer 'blocks.0.up' cannot be inverted.*dampening_frac",
        ),
        (torch.full((1, 4, 64), torch.nan), {}, r"Hessian of layer 'blocks.0.up' holds NaN or Inf"),
        (torch.zeros(1, 0, 64), {}, r"\['blocks.0.up', 'blocks.0.down'\] received no calibration"),
    ],
    ids=["singular", "nan", "no-tokens"],
)
def test_bad_hessians_name_the_layer_and_leave_the_block(x, settings, match):
    model = Stack()
    before = copy.deepcopy(model.state_dict())
    session = CompressionSession()
    session.initialize(
        recipe=GPTQModifier(config_groups=int8_channel_groups(), **settings), model=model
    )
    session.event(EventType.CALIBRATION_EPOCH_START)
    with torch.no_grad():
        model.blocks[0](x)
    with pytest.raises(ValueError, match=match):
        session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    session.lifecycle.abort()
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_gptq_without_calibration_data_is_a_recipe_error():
    model = tiny_decoder()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match="GPTQModifier needs calibration data"):
        oneshot(model, gptq())  # the data_free pipeline
    session = CompressionSession()
    session.initialize(recipe=gptq(), model=model)
    with pytest.raises(RecipeError, match="needs calibration data, but finalize ran without"):
        session.finalize()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"start": 0}, r"GPTQModifier.start: expected -1 \(GPTQ is one-shot"),
        ({"block_size": 0}, r"GPTQModifier.block_size: expected an int > 0, got 0"),
        ({"dampening_frac": 1.0}, r"GPTQModifier.dampening_frac: expected a float in \[0, 1\)"),
        ({"dampening_frac": -0.1}, r"GPTQModifier.dampening_frac: expected a float in \[0, 1\)"),
        ({"actorder": "sideways"}, r"GPTQModifier.actorder: expected one of \['static'"),
        (
            {"preserve_zeros": "pruned"},
            r"GPTQModifier.preserve_zeros: expected bool or one of \['auto'\], got 'pruned'",
        ),
        (
            {"config_groups": int8_channel_groups(), "actorder": "group"},
            r"GPTQModifier.actorder: expected .* 'channel'",
        ),
        (
            {
                "scheme": None,
                "config_groups": {"d": {"targets": ["Linear"], "weights": {"dynamic": True}}},
            },
            r"GPTQModifier.config_groups.d.weights.dynamic: expected False",
        ),
    ],
)
def test_settings_are_validated_with_the_field_named(settings, match):
    with pytest.raises(RecipeError, match=match):
        GPTQModifier(**{"scheme": "W4A16", **settings})


def test_a_group_size_that_does_not_divide_the_layer_is_refused():
    groups = {
        "w4": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "strategy": "group", "group_size": 48},
        }
    }
    session = CompressionSession()
    with pytest.raises(RecipeError, match=r"GPTQModifier: group_size \[48\] does not divide"):
        session.initialize(recipe=GPTQModifier(config_groups=groups), model=tiny_decoder())


# ----------------------------------------------------------- logging, offload
class Recorder(BaseLogger):
    def __init__(self) -> None:
        super().__init__("recorder")
        self.scalars: dict[str, float] = {}

    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        self.scalars[tag] = value


def test_losses_and_times_are_logged_and_kept():
    model, recorder = tiny_decoder(), Recorder()
    session = CompressionSession()
    session.initialize(recipe=gptq(), model=model, loggers=LoggerManager([recorder]))
    calibrated(model, session, token_ids(2))
    (modifier,) = session.lifecycle.recipe.modifiers
    name = "model.layers.1.mlp.down_proj"
    assert recorder.scalars[f"GPTQ/loss/{name}"] == modifier.layer_losses[name] > 0
    assert recorder.scalars[f"GPTQ/seconds/{name}"] > 0
    assert len(modifier.layer_losses) == len(modifier.layer_errors) == 14


def test_offloaded_hessians_give_the_same_weights():
    kept, offloaded = tiny_decoder(), tiny_decoder()
    calibrated(kept, gptq(), token_ids(2))
    calibrated(offloaded, gptq(offload_hessians=True), token_ids(2))
    assert all(
        torch.equal(a, b)
        for a, b in zip(kept.state_dict().values(), offloaded.state_dict().values(), strict=True)
    )


# ------------------------------------------------------------------ configs
def test_the_shipped_compress_config_runs(tmp_path, capsys):
    config = yaml.safe_load((CONFIGS / "compress" / "gptq_w4a16_bundled.yaml").read_text())
    config["model"] = {
        "class_path": "lightning_compress.lightning.language_model.CausalLMModule",
        "init_args": {
            "model": {
                "class_path": "lightning_compress.bundled.TinyDecoder",
                "init_args": {
                    "config": {
                        "hidden_size": 64,
                        "intermediate_size": 128,
                        "num_layers": 2,
                        "max_seq_len": 64,
                    }
                },
            }
        },
    }
    config.update(num_calibration_samples=4, max_seq_length=32, batch_size=2)
    config["trainer"]["enable_progress_bar"] = False
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["compress", "--config", str(path)])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"Perplexity on 16 windows .*: [\d.]+ before compression, [\d.]+ after", line
    )
