"""WandaPruningModifier through oneshot(): each layer keeps exactly the weights a slow reference
keeps from the inputs it saw; the channel-norm collector; the mask function.

The one-shot flow Wanda shares with SparseGPT (errors, cleanup, logs) is tested for both in
``test_sparsegpt_modifier.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.lightning.oneshot import calibration_loader, calibration_samples, oneshot
from lightning_compress.modifiers.pruning import WandaPruningModifier
from lightning_compress.modifiers.pruning.channel_norms import ChannelNormCollector
from lightning_compress.modifiers.pruning.wanda import wanda_mask

QUIET = {"enable_progress_bar": False}


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


def token_ids(n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(1))


def record_inputs(model: nn.Module) -> dict[str, list[torch.Tensor]]:
    """Each block linear's inputs, one per calibration forward."""
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
def ref_channel_norms(xs: list[torch.Tensor], masks: list[torch.Tensor] | None) -> list[float]:
    """``||x_j||_2`` over the real tokens, one token and one channel at a time."""
    width = xs[0].shape[-1]
    sums = [0.0] * width
    for index, x in enumerate(xs):
        values = x.double().tolist()
        for b, row in enumerate(values):
            for t, token in enumerate(row):
                if masks is None or masks[index][b, t]:
                    for j in range(width):
                        sums[j] += token[j] ** 2
    return [math.sqrt(total) for total in sums]


def ref_wanda_keep(
    weight: torch.Tensor, norms: list[float], sparsity: float, structure: tuple[int, int] | None
) -> torch.Tensor:
    """Per row, score ``|W_ij| * ||x_j||``; prune the lowest (lower column first among equal
    scores): ``round(sparsity * in)`` of the row, or ``m - n`` of every ``m`` columns."""
    keep = []
    for row in weight.double().tolist():
        scores = [abs(w) * norm for w, norm in zip(row, norms, strict=True)]
        groups = (
            [range(len(row))]
            if structure is None
            else [range(first, first + structure[1]) for first in range(0, len(row), structure[1])]
        )
        kept = [True] * len(row)
        for group in groups:
            pruned = (
                round(sparsity * len(group)) if structure is None else structure[1] - structure[0]
            )
            for j in sorted(group, key=lambda j: (scores[j], j))[:pruned]:
                kept[j] = False
        keep.append(kept)
    return torch.tensor(keep)


def assert_pruned_like_reference(
    original: nn.Module,
    pruned: nn.Module,
    inputs: dict[str, list[torch.Tensor]],
    sparsity: float,
    structure: tuple[int, int] | None,
    masks: list[torch.Tensor] | None = None,
) -> None:
    for name, xs in inputs.items():
        weight = original.get_submodule(name).weight.detach()
        keep = ref_wanda_keep(weight, ref_channel_norms(xs, masks), sparsity, structure)
        result = pruned.get_submodule(name).weight.detach()
        assert torch.equal(result, weight * keep), name  # only zeros, nothing else changes
        counts = keep.reshape(keep.shape[0], -1, structure[1] if structure else keep.shape[1])
        expected = structure[0] if structure else keep.shape[1] - round(sparsity * keep.shape[1])
        assert (counts.sum(-1) == expected).all(), name


# ------------------------------------------------------------ against the math
@pytest.mark.parametrize(
    ("sparsity", "mask_structure", "pipeline"),
    [
        (0.5, "0:0", "sequential"),
        (0.3, "0:0", "basic"),
        (0.5, "2:4", "sequential"),
        (0.75, "1:4", "sequential"),
    ],
    ids=["50%", "30%-basic", "2:4", "1:4"],
)
def test_each_layer_keeps_what_the_reference_keeps(sparsity, mask_structure, pipeline):
    model = tiny_decoder()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    recipe = WandaPruningModifier(
        sparsity=sparsity, mask_structure=mask_structure, ignore=["lm_head"]
    )
    calibrated(model, recipe, token_ids(), pipeline=pipeline)
    assert len(inputs) == 14 and all(len(xs) == 4 for xs in inputs.values())
    structure = None if mask_structure == "0:0" else tuple(map(int, mask_structure.split(":")))
    assert_pruned_like_reference(original, model, inputs, sparsity, structure)
    assert torch.equal(model.lm_head.weight, original.lm_head.weight)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == len(inputs)
    assert model.state_dict().keys() == original.state_dict().keys()


@pytest.mark.parametrize("make_model", [tiny_decoder, tiny_llama], ids=["tiny", "llama"])
def test_padded_tokens_are_left_out_of_the_norms(make_model):
    model = make_model()
    original = copy.deepcopy(model)
    inputs = record_inputs(model)
    rows = token_ids(4)
    dataset = [
        {"input_ids": row[:length]} for row, length in zip(rows, (32, 20, 32, 11), strict=True)
    ]
    recipe = WandaPruningModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"])
    calibrated(model, recipe, dataset, batch_size=2)
    loader = calibration_loader(calibration_samples(dataset, None, 32), batch_size=2)
    masks = [batch["attention_mask"] for batch in loader]
    assert_pruned_like_reference(original, model, inputs, 0.5, (2, 4), masks)


# ------------------------------------------------------------------ collector
def test_layers_reading_one_input_compute_its_norms_once():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    collector = ChannelNormCollector()
    for name, tensor in [("c", y), ("a", y), ("a", x), ("b", x)]:
        collector.observe(name, tensor)
    x.mul_(2)  # changed in place: the next reader of x reads the new values
    collector.observe("d", x)
    assert collector.num_reads == 3  # {c, a} y, {a, b} x, {d} 2x
    layers = {name: nn.Linear(8, 2) for name in "abcde"}
    norms = collector.reduced(layers)
    seen = {"a": [y, x / 2], "b": [x / 2], "c": [y], "d": [x], "e": []}
    for name, tensors in seen.items():
        rows = torch.cat([t.reshape(-1, 8) for t in tensors] or [torch.zeros(0, 8)]).double()
        torch.testing.assert_close(norms[name].values, rows.square().sum(0))
        assert norms[name].num_samples == rows.shape[0]
    collector.discard(["a"])
    assert collector.reduced({"a": layers["a"]})["a"].num_samples == 0


# -------------------------------------------------------------------- the mask
def test_each_row_is_pruned_on_its_own_and_ties_prune_the_lower_column():
    weight = torch.tensor([[1.0, -1.0, 3.0, 2.0], [4.0, 0.5, -0.5, 8.0]])
    norms = torch.tensor([2.0, 2.0, 1.0, 0.25])
    # scores: [[2, 2, 3, 0.5], [8, 1, 0.5, 2]]
    assert wanda_mask(weight, norms, 0.5).tolist() == [
        [False, True, True, False],
        [True, False, False, True],
    ]
    assert wanda_mask(weight, norms, 0.25).sum(1).tolist() == [3, 3]
    assert wanda_mask(weight, norms, 0.0).all()
    assert wanda_mask(weight, norms, 0.5, (1, 2)).tolist() == [
        [False, True, True, False],
        [True, False, False, True],
    ]


def test_wanda_beats_magnitude_when_input_channels_differ_in_scale():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * torch.logspace(-1, 1, 64)
    weight = torch.randn(32, 64, generator=gen)
    norms = x.square().sum(0).sqrt()
    wanda = weight * wanda_mask(weight, norms, 0.5)
    magnitude = weight * wanda_mask(weight, torch.ones(64), 0.5)
    assert (x @ (weight - wanda).T).norm() < 0.5 * (x @ (weight - magnitude).T).norm()


def test_norms_that_do_not_fit_the_weight_are_refused():
    with pytest.raises(ValueError, match=r"channel_norms of shape \(3,\) do not fit"):
        wanda_mask(torch.ones(2, 4), torch.ones(3), 0.5)
