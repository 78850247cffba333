"""SmoothQuantModifier: the scales of the paper, better W8A8, exact chains with GPTQ."""

from __future__ import annotations

import copy

import pytest
import torch
from modifiers.smoothing.models import (
    calibrate,
    inject_outliers,
    logits,
    tiny_decoder,
    token_batches,
)

from lightning_compress.core import CompressionSession
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier
from lightning_compress.modifiers.smoothing import SmoothQuantModifier, smoothquant_scale
from lightning_compress.pipelines import DataFreePipeline, PipelineOptions
from lightning_compress.recipe import RecipeError


def reference_scale(act: list[float], weight_columns: list[list[float]], alpha: float) -> list:
    """``s_j = max|X_j|^a / max|W_j|^(1-a)``, one channel at a time."""
    scales = []
    for j, act_max in enumerate(act):
        weight_max = max(abs(column[j]) for column in weight_columns)
        value = max(act_max, 1e-5) ** alpha / max(weight_max, 1e-5) ** (1 - alpha)
        scales.append(max(value, 1e-5))
    return scales


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_the_scale_formula_matches_a_channel_by_channel_reference(alpha):
    generator = torch.Generator().manual_seed(0)
    act = torch.rand(16, generator=generator) * 10
    act[3] = 0  # a dead channel
    weight = torch.randn(5, 16, generator=generator)
    expected = reference_scale(act.tolist(), weight.tolist(), alpha)
    got = smoothquant_scale(act, weight.abs().amax(dim=0), alpha)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=0)


def test_the_applied_scales_come_from_every_calibration_token():
    model = tiny_decoder()
    original = copy.deepcopy(model)
    seen: list[torch.Tensor] = []
    block = original.model.layers[0]
    block.self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    batches = token_batches()
    with torch.no_grad():
        for batch in batches:
            original(batch)
    calibrate(model, [SmoothQuantModifier(smoothing_strength=0.7)], batches)
    tokens = torch.cat([x.reshape(-1, 64) for x in seen])
    act = [max(abs(row[j]) for row in tokens.tolist()) for j in range(64)]
    balances = [getattr(block.self_attn, f"{p}_proj").weight for p in "qkv"]
    columns = [row for weight in balances for row in weight.tolist()]
    scale = torch.tensor(reference_scale(act, columns, 0.7))
    smoothed = model.model.layers[0]
    torch.testing.assert_close(
        smoothed.input_layernorm.weight, block.input_layernorm.weight / scale, rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        smoothed.self_attn.k_proj.weight, block.self_attn.k_proj.weight * scale, rtol=1e-5, atol=0
    )


def test_smoothing_lowers_the_w8a8_error_on_activation_outliers():
    model = tiny_decoder()
    inject_outliers(model)
    reference = copy.deepcopy(model)
    plain, smoothed = copy.deepcopy(model), copy.deepcopy(model)
    rtn = {"scheme": "W8A8", "ignore": ["lm_head"]}
    calibrate(plain, [QuantizationModifier(**rtn)])
    calibrate(smoothed, [SmoothQuantModifier(smoothing_strength=0.8), QuantizationModifier(**rtn)])
    ids = token_batches(2, seed=9)[1]

    def error(model: torch.nn.Module) -> float:
        return (logits(model, ids) - logits(reference, ids)).square().mean().item()

    assert error(smoothed) < 0.5 * error(plain)


# ----------------------------------------------------------------- chains
def test_smoothquant_then_gptq_in_one_pass_equals_gptq_on_the_smoothed_model(monkeypatch):
    w4 = {"num_bits": 4, "strategy": "group", "group_size": 32}
    gptq = {"config_groups": {"g": {"targets": ["Linear"], "weights": w4}}, "ignore": ["lm_head"]}
    model = tiny_decoder()
    inject_outliers(model)
    chained, two_passes = copy.deepcopy(model), copy.deepcopy(model)
    # What GPTQ is handed for each stack of layers (weights, Hessian) and the loss it reached.
    solved: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}
    solve = GPTQModifier._gptq

    def recording(self, stack, statistics):
        weight = torch.cat([self._pending[name][0].weight.detach() for name in stack])
        hessian = statistics.hessian()  # a new tensor, made before GPTQ uses the statistics
        result = solve(self, stack, statistics)
        solved[run][stack[0]] = (weight.clone(), hessian, result.loss)
        return result

    monkeypatch.setattr(GPTQModifier, "_gptq", recording)
    # block inputs stay the full-precision ones, the same in both runs
    options = {"propagate_compressed": False}
    smoothquant = {"smoothing_strength": 0.8}
    run = "chained"
    solved[run] = {}
    calibrate(chained, [SmoothQuantModifier(**smoothquant), GPTQModifier(**gptq)], **options)
    run = "two_passes"
    solved[run] = {}
    calibrate(two_passes, [SmoothQuantModifier(**smoothquant)], **options)
    calibrate(two_passes, [GPTQModifier(**gptq)], **options)
    assert solved["chained"].keys() == solved["two_passes"].keys()
    assert len(solved["chained"]) == 8  # q/k/v, o, gate/up, down in each of two blocks
    for name, (weight, hessian, loss) in solved["chained"].items():
        other_weight, other_hessian, other_loss = solved["two_passes"][name]
        # The chain hands GPTQ the smoothed weights and the rescaled Hessian of the smoothed
        # inputs: equal to rounding. GPTQ's error feedback amplifies a code that rounds the
        # other way, so its results are compared by the objective they reach.
        torch.testing.assert_close(weight, other_weight, rtol=1e-5, atol=1e-6)
        tolerance = 1e-6 * float(other_hessian.abs().max())
        torch.testing.assert_close(hessian, other_hessian, rtol=1e-5, atol=tolerance)
        assert loss == pytest.approx(other_loss, rel=0.02), name


# ------------------------------------------------------------------- errors
@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_a_strength_outside_zero_one_is_refused(strength):
    with pytest.raises(RecipeError, match=r"smoothing_strength: expected a float in \[0, 1\]"):
        SmoothQuantModifier(smoothing_strength=strength)


def test_smoothing_is_one_shot_only():
    with pytest.raises(RecipeError, match=r"SmoothQuantModifier.start: expected -1"):
        SmoothQuantModifier(start=0)


def test_without_calibration_data_it_is_a_recipe_error():
    model = tiny_decoder()
    session = CompressionSession()
    session.initialize(recipe=[SmoothQuantModifier()], model=model)
    with pytest.raises(RecipeError, match="SmoothQuantModifier needs calibration data, but"):
        session.finalize()
    session = CompressionSession()
    session.initialize(recipe=[SmoothQuantModifier()], model=model)
    with pytest.raises(RecipeError, match="no calibration batch reached block '<model>'"):
        DataFreePipeline(model, session, PipelineOptions())([])
