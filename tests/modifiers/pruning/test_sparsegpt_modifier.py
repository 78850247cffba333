"""SparseGPTModifier through oneshot(): each layer pruned as a slow reference prunes it from the
inputs it saw; and the one-shot flow both pruning modifiers share (errors, cleanup, logs)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import BaseLogger, CompressionSession, EventType, LoggerManager
from lightning_compress.lightning.oneshot import calibration_loader, calibration_samples, oneshot
from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.input_scaling import scale_inputs
from lightning_compress.modifiers.pruning import (
    SparseGPTModifier,
    WandaPruningModifier,
    sparsegpt_modifier,
)
from lightning_compress.recipe import RecipeError

QUIET = {"enable_progress_bar": False}
DAMP = 0.01
PRUNERS = [SparseGPTModifier, WandaPruningModifier]


def tiny_decoder(dtype: torch.dtype = torch.float64) -> TinyDecoder:
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
    return TinyDecoder(config).to(dtype).eval()


def token_ids(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))


def record_inputs(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each block linear's inputs, one per calibration forward (the pipeline suspends these
    hooks when it replays a compressed block, so they are exactly what the modifier saw)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    for name, layer in model.named_modules():
        if isinstance(layer, nn.Linear) and name != "lm_head":
            layer.register_forward_pre_hook(
                lambda m, args, n=name: inputs.setdefault(n, []).append(args[0].detach().clone())
            )
    return inputs


def calibrated(model: nn.Module, recipe: Any, dataset: Any, **kwargs: Any) -> nn.Module:
    kwargs.setdefault("num_calibration_samples", None)
    return oneshot(model, recipe, dataset=dataset, trainer_kwargs=QUIET, **kwargs)


# ----------------------------------------------------------------- the reference
def ref_hessian(xs: list[torch.Tensor], masks: list[torch.Tensor] | None) -> torch.Tensor:
    """``2/n sum x x^T`` over the real tokens, one token at a time, in float64."""
    tokens = []
    for index, x in enumerate(xs):
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if masks is None or masks[index][b, t]:
                    tokens.append(x[b, t].double())
    return sum(2 * torch.outer(row, row) for row in tokens) / len(tokens)


def ref_keep(scores: torch.Tensor, sparsity: float, structure: tuple[int, int] | None):
    """Keep mask: in each row, the ``n`` largest of every ``m``; or all but the smallest
    ``round(sparsity * numel)`` of the whole block. Equal scores: the lower index goes first."""
    values = scores.tolist()
    rows, cols = scores.shape
    keep = [[True] * cols for _ in range(rows)]
    if structure is not None:
        n, m = structure
        for i in range(rows):
            for first in range(0, cols, m):
                ranked = sorted(range(first, first + m), key=lambda j: (values[i][j], j))
                for j in ranked[: m - n]:
                    keep[i][j] = False
    else:
        cells = [(values[i][j], i * cols + j, i, j) for i in range(rows) for j in range(cols)]
        for _, _, i, j in sorted(cells)[: round(sparsity * rows * cols)]:
            keep[i][j] = False
    return torch.tensor(keep)


def ref_sparsegpt(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    structure: tuple[int, int] | None,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT as the paper states it: one column at a time with ``inv(H[j:, j:])``.

    The saliency of ``w`` in column ``k`` is ``w^2 / inv(H[k:, k:])[0, 0]``; the mask is
    chosen on entering each block of ``block_size`` columns (or run of ``m``). Returns the
    pruned weight and the keep mask.
    """
    w, h = weight.double().clone(), hessian.double().clone()
    width = w.shape[1]
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += DAMP * h.diagonal().mean() * torch.eye(width, dtype=h.dtype)
    d = torch.stack([torch.linalg.inv(h[k:, k:])[0, 0] for k in range(width)])
    span = structure[1] if structure is not None else block_size
    keep = torch.ones_like(w, dtype=torch.bool)
    for j in range(width):
        if j % span == 0:
            cols = slice(j, j + span)
            keep[:, cols] = ref_keep(w[:, cols].square() / d[cols], sparsity, structure)
        hinv = torch.linalg.inv(h[j:, j:])
        q = w[:, j] * keep[:, j]
        w[:, j:] -= ((w[:, j] - q) / hinv[0, 0])[:, None] * hinv[0]
        w[:, j] = q
    return w, keep


def assert_pruned_like_reference(
    original: nn.Module,
    pruned: nn.Module,
    inputs: dict[str, list[torch.Tensor]],
    settings: dict[str, Any],
    masks: list[torch.Tensor] | None = None,
) -> None:
    structure = settings.get("mask_structure")
    structure = tuple(int(k) for k in structure.split(":")) if structure else None
    for name, xs in inputs.items():
        expected, keep = ref_sparsegpt(
            original.get_submodule(name).weight.detach(),
            ref_hessian(xs, masks),
            settings["sparsity"],
            structure,
            settings.get("block_size", 128),
        )
        weight = pruned.get_submodule(name).weight.detach()
        assert torch.equal(weight != 0, keep), name
        torch.testing.assert_close(weight, expected, rtol=0, atol=1e-9)
        if structure is not None:  # exactly n kept in every group of m, in every row
            n, m = structure
            assert ((weight != 0).reshape(weight.shape[0], -1, m).sum(-1) == n).all(), name


# ------------------------------------------------------------ against the math
@pytest.mark.parametrize(
    ("settings", "pipeline"),
    [
        ({"sparsity": 0.5}, "sequential"),
        ({"sparsity": 0.3, "block_size": 48}, "sequential"),
        ({"sparsity": 0.5, "mask_structure": "2:4"}, "sequential"),
        ({"sparsity": 0.75, "mask_structure": "1:4", "block_size": 32}, "basic"),
    ],
    ids=["50%", "30%-blocks-of-48", "2:4", "1:4-basic"],
)
def test_each_layer_equals_sparsegpt_on_the_inputs_it_saw(settings, pipeline):
    model = tiny_decoder()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    recipe = SparseGPTModifier(ignore=["lm_head"], **settings)
    calibrated(model, recipe, token_ids(), pipeline=pipeline)
    assert len(inputs) == 14 and all(len(xs) == 4 for xs in inputs.values())
    assert_pruned_like_reference(original, model, inputs, settings)
    assert model.lm_head.weight.ne(0).all()
    # only the test's own hooks are left, and no buffer was added
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == len(inputs)
    assert model.state_dict().keys() == original.state_dict().keys()


def test_padded_tokens_are_left_out_of_the_hessian():
    model = tiny_decoder()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    rows = token_ids(4)
    dataset = [
        {"input_ids": row[:length]} for row, length in zip(rows, (32, 20, 32, 11), strict=True)
    ]
    settings = {"sparsity": 0.5, "mask_structure": "2:4"}
    calibrated(model, SparseGPTModifier(ignore=["lm_head"], **settings), dataset, batch_size=2)
    loader = calibration_loader(calibration_samples(dataset, None, 32), batch_size=2)
    masks = [batch["attention_mask"] for batch in loader]
    assert not masks[0].all()
    assert_pruned_like_reference(original, model, inputs, settings, masks)


@pytest.mark.parametrize(
    "mask_structure",
    ["0:0", "2:4"],
    ids=["unstructured", "2:4"],
)
def test_layers_reading_one_input_share_one_hessian(monkeypatch, mask_structure):
    calls: list[int] = []
    add = HessianAccumulator.add

    def counting_add(self, x, mask=None):
        calls.append(id(self))
        add(self, x, mask)

    rows: list[int] = []
    prune = sparsegpt_modifier.sparsegpt_prune

    def recording_prune(weight, *args, **kwargs):
        rows.append(weight.shape[0])
        return prune(weight, *args, **kwargs)

    monkeypatch.setattr(HessianAccumulator, "add", counting_add)
    monkeypatch.setattr(sparsegpt_modifier, "sparsegpt_prune", recording_prune)
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure=mask_structure, ignore=["lm_head"])
    calibrated(tiny_decoder(torch.float32), recipe, token_ids(3))
    # per block and batch: q/k/v, o, gate/up, down (not 7 layers)
    assert len(calls) == 2 * 3 * 4
    # rows are independent (unstructured masks are chosen per stacked layer): one sweep per
    # Hessian over the stacked layers
    assert rows == 2 * [128, 64, 256, 64]


# ------------------------------------------------------- logging (both pruners)
class Recorder(BaseLogger):
    def __init__(self) -> None:
        super().__init__("recorder")
        self.scalars: dict[str, float] = {}

    def log_scalar(self, tag: str, value: float, step: float | None = None) -> None:
        self.scalars[tag] = value


@pytest.mark.parametrize(
    ("pruner", "tag"), [(SparseGPTModifier, "SparseGPT"), (WandaPruningModifier, "Wanda")]
)
def test_sparsity_losses_and_times_are_logged_and_kept(pruner, tag):
    model, recorder = tiny_decoder(torch.float32), Recorder()
    session = CompressionSession()
    recipe = pruner(sparsity=0.25, ignore=["lm_head"])
    session.initialize(recipe=recipe, model=model, loggers=LoggerManager([recorder]))
    calibrated(model, session, token_ids(2))
    (modifier,) = session.lifecycle.recipe.modifiers
    name = "model.layers.1.mlp.down_proj"
    assert recorder.scalars[f"{tag}/sparsity/{name}"] == modifier.layer_sparsity[name] == 0.25
    assert recorder.scalars[f"{tag}/seconds/{name}"] > 0
    assert len(modifier.layer_sparsity) == 14
    if pruner is SparseGPTModifier:
        assert recorder.scalars[f"SparseGPT/loss/{name}"] == modifier.layer_losses[name] > 0
        assert len(modifier.layer_losses) == 14
    else:
        assert not modifier.layer_losses and not any("loss" in tag for tag in recorder.scalars)


# ---------------------------------------------------------- errors (both pruners)
@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"sparsity": 1.0}, r"\.sparsity: expected a float in \[0, 1\), got 1.0"),
        ({"sparsity": -0.1}, r"\.sparsity: expected a float in \[0, 1\), got -0.1"),
        ({"sparsity": "half"}, r"\.sparsity: expected float, got 'half'"),
        ({"mask_structure": "4:2"}, r"\.mask_structure: expected 'N:M' with 0 < N < M.*got '4:2'"),
        ({"mask_structure": "2-4"}, r"\.mask_structure: expected 'N:M' .*got '2-4'"),
        ({"mask_structure": "0:4"}, r"\.mask_structure: expected 'N:M' .*got '0:4'"),
        (
            {"sparsity": 0.3, "mask_structure": "2:4"},
            r"\.sparsity: expected 0.5 \(= 1 - N/M for mask_structure '2:4'\), got 0.3",
        ),
        ({"start": 0}, r"\.start: expected -1 \(\w+ is one-shot"),
    ],
)
def test_settings_are_validated_with_the_field_named(pruner, settings, match):
    with pytest.raises(RecipeError, match=rf"{pruner.__name__}{match}"):
        pruner(**{"sparsity": 0.5, **settings})


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"block_size": 0}, r"SparseGPTModifier.block_size: expected an int > 0, got 0"),
        (
            {"dampening_frac": 1.0},
            r"SparseGPTModifier.dampening_frac: expected a float in \[0, 1\)",
        ),
    ],
)
def test_sparsegpt_settings_are_validated_with_the_field_named(settings, match):
    with pytest.raises(RecipeError, match=match):
        SparseGPTModifier(sparsity=0.5, **settings)


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    assert list(model.state_dict()) == list(before)
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("pruner", PRUNERS)
@pytest.mark.parametrize(
    ("settings", "match"),
    [
        (
            {"sparsity": 2 / 3, "mask_structure": "1:3", "ignore": ["lm_head"]},
            r"mask_structure: '1:3' needs in_features divisible by 3, but \['model.layers.0",
        ),
        (
            {"sparsity": 0.5, "targets": ["RMSNorm"]},
            r"targets: module .* is a RMSNorm holding no Linear",
        ),
    ],
    ids=["n:m-width", "not-linear"],
)
def test_layers_that_do_not_fit_are_refused_before_the_model_changes(pruner, settings, match):
    model = tiny_decoder(torch.float32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RecipeError, match=rf"{pruner.__name__}\.{match}"):
        calibrated(model, pruner(**settings), token_ids(2))
    assert_untouched(model, before)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_no_calibration_data_is_a_recipe_error_and_leaves_the_model(pruner):
    model = tiny_decoder(torch.float32)
    before = copy.deepcopy(model.state_dict())
    recipe = pruner(sparsity=0.5, ignore=["lm_head"])
    with pytest.raises(RecipeError, match=rf"{pruner.__name__} needs calibration data, but no"):
        oneshot(model, recipe)  # the data_free pipeline
    session = CompressionSession()
    session.initialize(recipe=pruner(sparsity=0.5, ignore=["lm_head"]), model=model)
    with pytest.raises(RecipeError, match="needs calibration data, but finalize ran without"):
        session.finalize()
    assert_untouched(model, before)


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
            r"layer 'blocks.0.up' cannot be inverted.*SparseGPTModifier.dampening_frac higher",
        ),
        (torch.full((1, 4, 64), torch.nan), {}, r"Hessian of layer 'blocks.0.up' holds NaN or Inf"),
    ],
    ids=["singular", "nan"],
)
def test_bad_hessians_name_the_layer_and_leave_the_block(x, settings, match):
    model = Stack()
    before = copy.deepcopy(model.state_dict())
    session = CompressionSession()
    session.initialize(recipe=SparseGPTModifier(sparsity=0.5, **settings), model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    with torch.no_grad():
        model.blocks[0](x)
    with pytest.raises(ValueError, match=match):
        session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    session.lifecycle.abort()
    assert_untouched(model, before)


@pytest.mark.parametrize("pruner", PRUNERS)
def test_a_block_is_pruned_at_its_own_event_and_its_hooks_go(pruner):
    model = Stack()
    session = CompressionSession()
    session.initialize(recipe=pruner(sparsity=0.5), model=model)
    session.event(EventType.CALIBRATION_EPOCH_START)
    x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.blocks[1](model.blocks[0](x))
    session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=model.blocks[0])
    first, second = model.blocks
    assert first.up.weight.eq(0).float().mean() == 0.5 and second.up.weight.ne(0).all()
    assert not first.up._forward_pre_hooks and second.up._forward_pre_hooks
    with pytest.raises(ValueError, match="SEQUENTIAL_EPOCH_END needs subgraph=<the module"):
        session.event(EventType.SEQUENTIAL_EPOCH_END, subgraph=None)
    session.lifecycle.abort()
    assert not any(m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("pruner", PRUNERS)
def test_statistics_follow_inputs_that_smoothing_rescales_after_calibration(pruner):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 64, generator=gen)
    scale = torch.rand(64, generator=gen) + 0.5
    smoothed, direct = Stack(), Stack()
    with torch.no_grad():
        direct.blocks[0].up.weight.mul_(scale)
    for model, inputs, smooth in ((smoothed, x, True), (direct, x / scale, False)):
        session = CompressionSession()
        session.initialize(recipe=pruner(sparsity=0.5, targets=["blocks.0.up"]), model=model)
        session.event(EventType.CALIBRATION_EPOCH_START)
        with torch.no_grad():
            model.blocks[0].up(inputs)
        if smooth:  # as SmoothQuant/AWQ do at the block's event, before the pruner's turn
            scale_inputs([model.blocks[0].up], scale)
        session.event(EventType.CALIBRATION_EPOCH_END)
        session.finalize()
    pruned, expected = smoothed.blocks[0].up.weight, direct.blocks[0].up.weight
    assert torch.equal(pruned != 0, expected != 0)
    torch.testing.assert_close(pruned, expected)
