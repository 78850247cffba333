"""FSDP2 (ModelParallelStrategy, 2 CPU processes) trains a tiny Hugging Face Llama with QAT
(4-bit weights, moving-average static inputs) and kept 2:4 zeros exactly like one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("fsdp2_qat_run.py")


def run(mode: str, out: Path) -> dict:
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return torch.load(out / "state.pt", weights_only=True)


def test_fsdp2_qat_with_masks_shards_the_compression_state_and_trains_like_one_process(tmp_path):
    single, sharded = run("single", tmp_path / "single"), run("fsdp2", tmp_path / "fsdp2")
    assert not single["sharded"]
    assert any(name.endswith("weight_mask") for name in sharded["sharded"])
    assert any(name.endswith("parametrizations.weight.original") for name in sharded["sharded"])
    expected, state = single["state"], sharded["state"]
    assert state.keys() == expected.keys()
    assert any(name.endswith("input_min_vals") for name in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in state.items():
        if name.endswith("_proj.parametrizations.weight.original"):
            assert (tensor == 0).float().mean().item() == 0.5, name
