"""The activation cache, in memory and spilled to disk."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lightning_compress.pipelines import ActivationCache, BlockInputs


def inputs(seed: int) -> BlockInputs:
    generator = torch.Generator().manual_seed(seed)
    cos_sin = (torch.randn(1, 4, 8, generator=generator), torch.randn(1, 4, 8))
    return BlockInputs(
        (torch.randn(2, 4, 8, generator=generator), None),
        {"position_embeddings": cos_sin, "use_cache": False, "mask": torch.ones(2, 4)},
    )


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(map(equal, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(equal(a[key], b[key]) for key in a)
    return a == b


def same(a: BlockInputs, b: BlockInputs) -> bool:
    return equal((a.args, a.kwargs), (b.args, b.kwargs))


@pytest.mark.parametrize("spill", [False, True])
def test_stage_commit_and_discard(tmp_path, spill):
    cache = ActivationCache(tmp_path if spill else None)
    originals = [inputs(seed) for seed in range(3)]
    for item in originals:
        cache.append(item)
    assert len(cache) == 3
    assert all(same(cache.inputs(i), originals[i]) for i in range(3))

    cache.stage_output(0, torch.zeros(2, 4, 8))
    with pytest.raises(RuntimeError, match="1 of 3 batches have a staged output"):
        cache.commit_outputs()
    cache.discard_outputs()
    assert same(cache.inputs(0), originals[0])

    for index in range(3):
        cache.stage_output(index, torch.full((2, 4, 8), float(index)))
    cache.commit_outputs()
    for index, item in enumerate(originals):
        expected = item.with_hidden_states(torch.full((2, 4, 8), float(index)))
        assert same(cache.inputs(index), expected)
    if spill:
        assert {path.name for path in cache.directory.iterdir()} == {
            f"{kind}_{i}.pt" for kind in ("shared", "hidden") for i in range(3)
        }
    cache.close()
    assert not any(tmp_path.iterdir())
