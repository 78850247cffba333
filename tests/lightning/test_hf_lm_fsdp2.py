"""DDP and FSDP2 (ModelParallelStrategy), 2 CPU processes each, train a tiny Hugging Face
Llama with QAT (4-bit weights, moving-average static inputs) and kept 2:4 zeros exactly like
one process."""

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


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    return run("single", tmp_path_factory.mktemp("runs") / "single")


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_qat_with_masks_trains_like_one_process_with_the_state_sharded_under_fsdp2(
    single, mode, tmp_path
):
    report = run(mode, tmp_path / mode)
    assert not single["sharded"]
    if mode == "fsdp2":
        assert any(name.endswith("weight_mask") for name in report["sharded"])
        assert any(name.endswith("weight.original") for name in report["sharded"])
    expected, state = single["state"], report["state"]
    assert state.keys() == expected.keys()
    assert any(name.endswith("input_min_vals") for name in expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)
    for name, tensor in state.items():
        if name.endswith("_proj.parametrizations.weight.original"):
            assert (tensor == 0).float().mean().item() == 0.5, name
