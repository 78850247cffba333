"""Coverage of the decoder blocks' weights: compressed, ignored on purpose, or left out (warned;
refused before any change with ``strict=True``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from export_models import tiny_model, token_ids, w4a16
from helpers import int8_channel_groups
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import Logger
from lightning_models import Regressor, regression_loader
from loguru import logger
from moe_models import tiny_moe
from safetensors.torch import load_file
from torch import nn

from lightning_compress import Compressor
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import (
    GPTQModifier,
    MagnitudePruningModifier,
    QuantizationModifier,
    SmoothQuantModifier,
)
from lightning_compress.recipe import RecipeError
from lightning_compress.summary import CompressionSummary

WIDTH = 32


class Matmul(nn.Module):
    """A layer type no adapter knows: its own 2-D weight, used in a matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / math.sqrt(WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.mix = Matmul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mix(self.proj(self.norm(x)))


class Decoder(nn.Module):
    """Two blocks with a Linear and a ``Matmul`` each, between an embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(64, WIDTH)
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(WIDTH, 64, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for block in self.layers:
            hidden = block(hidden)
        return self.head(hidden)


@pytest.fixture
def warnings():
    """The WARNING messages loguru emits during a test."""
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


def rtn(ignore: list[str]) -> QuantizationModifier:
    return QuantizationModifier(config_groups=int8_channel_groups(), ignore=ignore)


def test_a_layer_type_no_adapter_knows_is_left_out_and_named_in_a_warning(warnings):
    summary = CompressionSummary()
    oneshot(Decoder(), rtn(["head"]), summary=summary, progress=False)
    coverage = summary.coverage
    assert coverage.compressed == {
        "layers.0.proj.weight": "W8A16 (int8 per-channel)",
        "layers.1.proj.weight": "W8A16 (int8 per-channel)",
    }
    reason = "Matmul (no layer adapter makes it an nn.Linear)"
    assert coverage.left_out == {"layers.0.mix.weight": reason, "layers.1.mix.weight": reason}
    assert coverage.ignored == []
    # norms and biases are no weights to count; the embedding and head lie outside the blocks
    weights = [f"layers.{index}.{layer}.weight" for index in (0, 1) for layer in ("proj", "mix")]
    assert coverage.elements == dict.fromkeys(weights, WIDTH * WIDTH)
    assert coverage.compressed_fraction == 0.5
    (warning,) = [message for message in warnings if "left out" in message]
    assert f"{reason}: layers.*.mix.weight x2" in warning
    assert "2 weight tensors of the decoder blocks layers.0 to layers.1 (50.0% of" in warning
    assert "2 of 4 weight tensors compressed (50.0% of 4,096 elements" in summary.format()


def test_strict_refuses_a_recipe_that_leaves_weights_out_before_the_model_changes():
    model = Decoder()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(RecipeError, match=r"strict: .*layers\.\*\.mix\.weight x2"):
        oneshot(model, rtn(["head"]), progress=False, strict=True)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    for module in model.modules():
        assert not (module._forward_hooks or module._forward_pre_hooks)
        assert not hasattr(module, "quantization_scheme")


def test_ignored_weights_are_reported_as_ignored_and_strict_accepts_the_recipe(warnings):
    summary = CompressionSummary()
    oneshot(Decoder(), rtn(["head", "re:.*mix"]), summary=summary, progress=False, strict=True)
    assert summary.coverage.ignored == ["layers.0.mix.weight", "layers.1.mix.weight"]
    assert summary.coverage.left_out == {}
    assert not [message for message in warnings if "left out" in message]
    assert "2 ignored (50.0% of elements), 0 left out" in summary.format()


def test_strict_refuses_an_ignore_pattern_that_matches_nothing_in_any_modifier():
    model = Decoder()
    with pytest.raises(RecipeError, match=r"\['re:.*mixer'\] match no module"):
        oneshot(model, rtn(["head", "re:.*mix", "re:.*mixer"]), progress=False, strict=True)
    smoothing = SmoothQuantModifier(ignore=["re:.*nothing"])
    with pytest.raises(RecipeError, match=r"SmoothQuantModifier.ignore: \['re:.*nothing'\]"):
        oneshot(model, [smoothing, rtn(["head", "re:.*mix"])], progress=False, strict=True)
    assert not any(hasattr(module, "quantization_scheme") for module in model.modules())


def test_strict_is_a_switch_of_the_run_not_a_setting_saved_with_the_recipe():
    module = CalibrationModule(Decoder(), rtn(["head", "re:.*mix"]), strict=True)
    module.calibrate()
    assert "strict" not in module.session.get_serialized_recipe()


def test_a_full_run_covers_every_weight_as_the_checkpoint_stores_it(tmp_path, warnings):
    model = tiny_model("llama")
    summary = CompressionSummary()
    oneshot(model, w4a16(), output_dir=tmp_path, summary=summary, progress=False, strict=True)
    coverage = summary.coverage
    assert coverage.left_out == {} and coverage.ignored == []
    assert coverage.compressed_fraction == 1.0
    assert set(coverage.compressed.values()) == {"W4A16 (int4 g32)"}
    assert not [message for message in warnings if "left out" in message]
    assert "14 of 14 weight tensors compressed (100.0% of" in summary.format()

    tensors = {}
    for path in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(path))
    packed = {
        key.removesuffix("_packed"): tensors[key.replace("weight_packed", "weight_shape")]
        for key in tensors
        if key.startswith("model.layers.") and key.endswith(".weight_packed")
    }
    assert set(packed) == set(coverage.compressed)
    assert coverage.elements == {name: int(shape.prod()) for name, shape in packed.items()}
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"]


def test_strict_checks_experts_as_linear_layers_and_undoes_that_swap_when_it_refuses():
    model = tiny_moe("qwen3_moe")
    experts = type(model.model.layers[0].mlp.experts)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    attention_only = QuantizationModifier(
        config_groups=int8_channel_groups([r"re:.*self_attn\..*_proj$"]), ignore=["lm_head"]
    )
    left_out = r"Linear layers no target matches: model\.layers\.\*\.mlp\.experts\.\*\.gate_proj"
    with pytest.raises(RecipeError, match=left_out):
        oneshot(model, attention_only, progress=False, strict=True)
    assert type(model.model.layers[0].mlp.experts) is experts
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())

    summary = CompressionSummary()
    oneshot(model, rtn(["lm_head"]), summary=summary, progress=False, strict=True)
    coverage = summary.coverage
    assert coverage.left_out == {}
    experts_weights = {name for name in coverage.compressed if ".mlp.experts." in name}
    assert len(experts_weights) == 2 * 4 * 3  # blocks x experts x (gate, up, down)


def test_routers_are_kept_in_full_precision_unless_a_target_names_them(warnings):
    model = tiny_moe("qwen2_moe")
    router = model.model.layers[0].mlp.gate.weight.detach().clone()
    summary = CompressionSummary()
    oneshot(model, rtn(["lm_head"]), summary=summary, progress=False, strict=True)
    coverage = summary.coverage
    routers = [f"model.layers.{i}.mlp.{layer}.weight" for i in (0, 1) for layer in ("gate",)]
    shared_gates = [f"model.layers.{i}.mlp.shared_expert_gate.weight" for i in (0, 1)]
    assert sorted(coverage.routers) == sorted(routers + shared_gates)
    assert coverage.left_out == {} and not warnings
    assert "4 routers kept" in coverage.format()
    assert torch.equal(model.model.layers[0].mlp.gate.weight, router)
    assert not hasattr(model.model.layers[0].mlp.shared_expert_gate, "weight_scale")

    named = tiny_moe("qwen2_moe")
    recipe = QuantizationModifier(
        config_groups=int8_channel_groups(["Linear", r"re:.*shared_expert_gate$"]),
        ignore=["lm_head"],
    )
    oneshot(named, recipe, progress=False)
    assert hasattr(named.model.layers[0].mlp.shared_expert_gate, "weight_scale")


class MetricsLogger(Logger):
    """A Trainer logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "metrics"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.update(metrics)

    def log_hyperparams(self, params: object, *args: object, **kwargs: object) -> None:
        pass


def trainer(metrics: Logger | None = None, **settings: object) -> Trainer:
    return Trainer(
        accelerator="cpu",
        logger=metrics or False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **settings,
    )


def pruning(targets: list[str]) -> MagnitudePruningModifier:
    return MagnitudePruningModifier(targets=targets, final_sparsity=0.5, start=0, end=1)


def test_a_calibration_on_a_trainer_sends_its_coverage_to_the_trainers_loggers():
    metrics = MetricsLogger()
    calibration = trainer(metrics, inference_mode=False)
    recipe = GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"])
    oneshot(tiny_model("llama"), recipe, token_ids(), 8, trainer=calibration, progress=False)
    assert {
        "compression/coverage/compressed_tensors": 14.0,
        "compression/coverage/left_out_tensors": 0.0,
        "compression/coverage/compressed_elements_fraction": 1.0,
    }.items() <= metrics.metrics.items()


def test_training_reports_its_coverage_to_the_trainers_loggers_and_warns(warnings):
    metrics = MetricsLogger()
    compressor = Compressor(pruning(["fc1"]))
    trainer(metrics, max_epochs=1, callbacks=[compressor]).fit(Regressor(), regression_loader())
    coverage = compressor.summary.coverage
    assert coverage.compressed == {"fc1.weight": "unstructured sparse"}
    assert coverage.left_out == {"fc2.weight": "Linear layers no target matches"}
    assert {
        "compression/coverage/compressed_tensors": 1.0,
        "compression/coverage/ignored_tensors": 0.0,
        "compression/coverage/left_out_tensors": 1.0,
        "compression/coverage/compressed_elements_fraction": 16 * 32 / (16 * 32 + 32 * 4),
    }.items() <= metrics.metrics.items()
    (warning,) = [message for message in warnings if "left out" in message]
    assert "Linear layers no target matches: fc2.weight" in warning


def test_compressor_strict_refuses_before_training_and_leaves_the_model_as_it_was():
    module = Regressor()
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    compressor = Compressor(pruning(["fc1"]), strict=True)
    with pytest.raises(RecipeError, match=r"strict: .*fc2\.weight"):
        trainer(max_epochs=1, callbacks=[compressor]).fit(module, regression_loader())
    after = module.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert not compressor.session.lifecycle.initialized_
