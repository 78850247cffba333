"""Learnable weight scales (LSQ) in quantization-aware training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.learnable import (
    learned_scale_parameters,
    lsq_fake_quantize,
)
from lightning_compress.modifiers.quantization.ops import fake_quantize
from lightning_compress.recipe import RecipeError


def int_args(strategy: str = "channel", **kw) -> QuantizationArgs:
    return QuantizationArgs(num_bits=4, strategy=strategy, **kw)


def reference_gradients(w, scale, upstream, qmin, qmax, per_scale):
    """LSQ's gradients, element by element in plain Python (one scale per row)."""
    grad_w = torch.zeros_like(w)
    grad_s = torch.zeros_like(scale)
    factor = 1 / math.sqrt(per_scale * qmax)
    for i in range(w.shape[0]):
        s = float(scale[i])
        for j in range(w.shape[1]):
            v = float(w[i, j]) / s
            g = float(upstream[i, j])
            if v < qmin:
                grad_s[i] += qmin * g * factor
            elif v > qmax:
                grad_s[i] += qmax * g * factor
            else:
                grad_s[i] += (round(v) - v) * g * factor
                grad_w[i, j] = g
    return grad_w, grad_s


def test_scale_and_weight_gradients_are_lsq_s():
    torch.manual_seed(0)
    args = int_args()
    w = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    # small scales so that some values are clamped on both sides
    scale = torch.tensor([[0.1], [0.2], [0.5]], dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(3, 16, dtype=torch.float64)
    x_hat, stored = lsq_fake_quantize(w, scale, args)
    (x_hat * upstream).sum().backward()
    expected_w, expected_s = reference_gradients(w.detach(), scale.detach(), upstream, -8, 7, 16)
    torch.testing.assert_close(w.grad, expected_w)
    torch.testing.assert_close(scale.grad, expected_s)
    torch.testing.assert_close(stored, scale.detach())
    assert (w.detach() / scale.detach()).abs().max() > 8  # the clamp was exercised


@pytest.mark.parametrize(
    "args",
    [
        int_args("group", group_size=8),
        QuantizationArgs(num_bits=8, type="float", strategy="channel"),
        QuantizationArgs(
            num_bits=4,
            type="float",
            strategy="tensor_group",
            group_size=16,
            scale_dtype="float8_e4m3fn",
        ),
        QuantizationArgs(
            num_bits=4, type="float", strategy="group", group_size=32, scale_dtype="uint8"
        ),
    ],
    ids=["int4-group", "fp8-channel", "nvfp4", "mxfp4"],
)
def test_forward_equals_fake_quantize_with_the_stored_scale(args):
    """... where the stored scale is the learned one in the format's scale encoding."""
    torch.manual_seed(1)
    w = torch.randn(4, 64)
    groups = 64 if args.strategy == "channel" else args.group_size
    scale = torch.rand(4, 64 // groups) * 0.3 + 0.05
    tensor_scale = torch.tensor([37.0]) if args.strategy == "tensor_group" else None
    if tensor_scale is not None:
        scale = scale * 40
    x_hat, stored = lsq_fake_quantize(w, scale.requires_grad_(), args, tensor_scale)
    expected = fake_quantize(w, stored, torch.zeros_like(stored), args, tensor_scale)
    assert torch.equal(x_hat, expected)  # the same float operations on the same values
    if args.scale_dtype == "float8_e4m3fn":
        assert torch.equal(stored.to(torch.float8_e4m3fn).float(), stored)
    if args.scale_dtype == "uint8":
        assert torch.equal(torch.log2(stored).round(), torch.log2(stored))


# ---------------------------------------------------------------- the modifier
def make_model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128))


def toy_batch(step: int, fixed: bool = False) -> torch.Tensor:
    seed = 100 if fixed else 100 + step
    return torch.randn(16 if not fixed else 64, 128, generator=torch.Generator().manual_seed(seed))


class Run:
    """Distils ``teacher`` into a fake-quantized copy, stepping the session's events by hand."""

    def __init__(
        self,
        learnable: bool,
        scheme: str = "W4A16",
        seed: int = 0,
        start: int = 0,
        fixed_batch: bool = False,
        **modifier_kw,
    ) -> None:
        self.teacher = make_model(seed)
        self.model = copy.deepcopy(self.teacher)
        modifier = QuantizationModifier(
            scheme=scheme,
            targets=["Linear"],
            start=start,
            learnable_scales=learnable,
            **modifier_kw,
        )
        self.session = CompressionSession()
        self.session.initialize(recipe=modifier, model=self.model)
        scales = learned_scale_parameters(self.model)
        others = [p for p in self.model.parameters() if all(p is not s for s in scales)]
        groups = [{"params": others}, {"params": scales, "lr": 1e-4}] if scales else others
        self.optimizer = torch.optim.Adam(groups, lr=1e-3)
        self.fixed_batch = fixed_batch
        self.losses: list[float] = []

    def step(self, step: int) -> None:
        event = self.session.event
        event(EventType.BATCH_START, global_step=step, global_batch=step)
        x = toy_batch(step, self.fixed_batch)
        loss = (self.model(x) - self.teacher(x).detach()).square().mean()
        event(EventType.LOSS_CALCULATED, loss=loss)
        loss.backward()
        event(EventType.OPTIM_PRE_STEP)
        self.optimizer.step()
        self.optimizer.zero_grad()
        event(EventType.OPTIM_POST_STEP)
        event(EventType.BATCH_END)
        self.losses.append(loss.item())


def test_scales_are_parameters_the_optimizer_trains():
    run = Run(learnable=True)
    scales = learned_scale_parameters(run.model)
    params = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
    assert all(id(s) in params for s in scales)
    run.step(0)
    initial = [s.detach().clone() for s in scales]
    for step in range(1, 6):
        run.step(step)
    assert any(not torch.equal(a, s.detach()) for a, s in zip(initial, scales, strict=True))
    layer = run.model[0]
    stored = layer.weight_scale
    layer.weight  # the forward writes the stored scale  # noqa: B018
    torch.testing.assert_close(stored, layer.parametrizations.weight[0].scale.detach())


def test_learned_scales_fit_a_fixed_batch_closer_than_min_max_scales():
    fixed, learnable = Run(learnable=False, fixed_batch=True), Run(True, fixed_batch=True)
    for step in range(30):
        fixed.step(step)
        learnable.step(step)
    # both start from the same min-max scales; the learned ones add degrees of freedom
    assert learnable.losses[0] == fixed.losses[0]
    assert learnable.losses[-1] < fixed.losses[-1] < fixed.losses[0]


def test_resume_from_a_checkpoint_continues_exactly():
    uninterrupted = Run(learnable=True, start=2)
    for step in range(8):
        uninterrupted.step(step)
    first_half = Run(learnable=True, start=2)
    for step in range(4):
        first_half.step(step)
    resumed = Run(learnable=True, start=2, seed=1)  # a fresh set-up, as Lightning's makes it
    resumed.teacher.load_state_dict(first_half.teacher.state_dict())
    resumed.model.load_state_dict(first_half.model.state_dict(), strict=True)
    resumed.optimizer.load_state_dict(first_half.optimizer.state_dict())
    for step in range(4, 8):
        resumed.step(step)
    assert resumed.losses == uninterrupted.losses[4:]
    for run in (uninterrupted, resumed):
        run.session.finalize()
    expected = uninterrupted.model.state_dict()
    assert list(resumed.model.state_dict()) == list(expected)
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_freeze_observers_stops_the_scales_where_they_are():
    run = Run(learnable=True, freeze_observers=3)
    for step in range(3):
        run.step(step)
    layer = run.model[0]
    learned = layer.parametrizations.weight[0].scale.detach().clone()
    for step in range(3, 6):
        run.step(step)
    assert torch.equal(layer.parametrizations.weight[0].scale, learned)
    assert torch.equal(layer.weight_scale, learned)  # the forwards use the last learned scale


def test_asymmetric_weights_are_refused():
    with pytest.raises((RecipeError, ValueError), match="symmetric"):
        Run(learnable=True, scheme="W4A16_ASYM")


def test_one_shot_refuses_learnable_scales():
    with pytest.raises((RecipeError, ValueError), match="learnable_scales"):
        QuantizationModifier(scheme="W4A16", targets=["Linear"], learnable_scales=True)


def test_small_scales_of_a_bfloat16_weight_are_kept():
    w = torch.randn(4, 64, dtype=torch.bfloat16) * 1e-3
    scale = torch.full((4, 1), 2e-4)  # far below bfloat16's eps (2**-7), as in LLM layers
    x_hat, stored = lsq_fake_quantize(w, scale, int_args())
    torch.testing.assert_close(stored, scale.to(torch.bfloat16).float())
    # the arithmetic runs in the scale's float32; the result is rounded to bfloat16 once
    expected = fake_quantize(w.float(), stored, torch.zeros_like(stored), int_args())
    assert torch.equal(x_hat, expected.to(torch.bfloat16))
