"""Two CPU processes (ddp_fork, gloo): SparseGPT and Wanda prune exactly like one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from calibration_runs import calibrate_tiny_decoder

from lightning_compress.bundled import TinyDecoderConfig
from lightning_compress.modifiers import Modifier
from lightning_compress.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

pytestmark = pytest.mark.distributed


def recipe() -> list[Modifier]:
    """SparseGPT 2:4 on q/k/v and gate/up (shared Hessians); unstructured Wanda on o and down."""
    return [
        SparseGPTModifier(
            sparsity=0.5, mask_structure="2:4", targets=[r"re:.*(q|k|v|gate|up)_proj$"]
        ),
        WandaPruningModifier(sparsity=0.625, targets=[r"re:.*(o|down)_proj$"]),
    ]


def calibrate(directory: Path, **trainer_kwargs: Any) -> None:
    config = TinyDecoderConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=64
    )
    calibrate_tiny_decoder(directory, recipe(), config, **trainer_kwargs)


def test_two_ranks_prune_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate(single, devices=1)  # on one thread, as each DDP worker (tests/conftest.py)
    calibrate(ddp, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    for layer, kept in (("self_attn.k_proj", 0.5), ("mlp.down_proj", 0.375)):
        weight = expected[f"model.layers.1.{layer}.weight"]
        assert (weight != 0).float().mean() == kept
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor != 0, expected[name] != 0), name
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6, msg=name)
