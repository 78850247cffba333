"""Padded tokens stay out of layer statistics, also where a layer reads the tokens flattened."""

from __future__ import annotations

import torch

from lightning_compress.modifiers.layerwise import TokenMaskTracker


def tracker_with(mask: torch.Tensor) -> TokenMaskTracker:
    tracker = TokenMaskTracker()
    tracker.current = mask
    return tracker


def test_a_batch_laid_out_input_gets_the_mask_as_it_is():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert torch.equal(tracker_with(mask).mask_for(torch.zeros(2, 3, 8)), mask)


def test_flattened_tokens_get_the_mask_flattened_in_the_same_order():
    """A mixture's experts and routers read ``hidden.view(-1, hidden_size)``."""
    mask = torch.tensor([[True, True, False], [True, False, False]])
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    flat = hidden.view(-1, 4)
    found = tracker_with(mask).mask_for(flat)
    assert torch.equal(flat[found], hidden[mask])


def test_an_input_of_another_token_count_gets_no_mask():
    mask = torch.ones(2, 3, dtype=torch.bool)
    tracker = tracker_with(mask)
    assert tracker.mask_for(torch.zeros(4, 8)) is None  # a subset of the tokens (routed)
    assert tracker.mask_for(torch.zeros(2, 4, 8)) is None
    assert TokenMaskTracker().mask_for(torch.zeros(6, 8)) is None
