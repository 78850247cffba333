"""Which tensors a layer read from a norm's output: itself, a view, or rows gathered from it."""

from __future__ import annotations

import torch

from lightning_compress.modifiers.smoothing.probe import reads_rows


def test_views_and_gathered_rows_are_read_from_the_source():
    source = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    flat = source.view(-1, 8)
    assert reads_rows(source, source)
    assert reads_rows(source, flat)  # a mixture's experts read the tokens flattened
    assert reads_rows(source, flat[torch.tensor([7, 1, 1, 9])])  # the tokens routed to one
    assert reads_rows(source.to(torch.bfloat16), flat.to(torch.bfloat16)[[3]].float())


def test_other_values_are_not_read_from_the_source():
    source = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    flat = source.view(-1, 8)
    assert not reads_rows(source, flat[:3] * 2)
    assert not reads_rows(source, flat[:3].clone().index_fill_(1, torch.tensor([4]), 0.5))
    assert not reads_rows(source, flat[:, :4])  # another width
    assert not reads_rows(source, flat[:3].double() + 1e-12)  # a cast that is not lossless
