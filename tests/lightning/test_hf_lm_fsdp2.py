"""DDP and FSDP2 (ModelParallelStrategy), 2 CPU processes each, train a tiny Hugging Face
Llama for four steps with QAT (asymmetric 4-bit weights, moving-average static inputs) and
kept 2:4 zeros like one process, up to float rounding (why symmetric weights cannot be
compared over several steps: ``fsdp2_qat_run.STEPS``), and every rank reports the whole
model's sparsity and pruned layers as one process does; under FSDP2 a GPTQ one-shot stage
runs on the whole model and the trained model's checkpoint is the one process's."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from forked_ranks import run_ranks
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.distributed

EXPORT_SCRIPT = Path(__file__).with_name("fsdp2_export_run.py")
_SPEC = importlib.util.spec_from_file_location(
    "fsdp2_qat_run", Path(__file__).with_name("fsdp2_qat_run.py")
)
qat_run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(qat_run)


def launch(script: Path, mode: str, out: Path) -> None:
    """Run ``script`` in ``mode`` (Lightning starts the second rank itself)."""
    out.mkdir()
    result = subprocess.run(
        [sys.executable, str(script), mode, str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def run(mode: str, out: Path) -> dict:
    """Train in ``mode``: one process here, or 2 ranks forked from it; return their reports."""
    out.mkdir()
    if mode == "single":
        qat_run.run(mode, out)
    else:
        run_ranks(qat_run.run, mode, out)
    report = torch.load(out / "state.pt", weights_only=True)
    reported = sorted(out.glob("reported_*.pt"))
    report["reported"] = [torch.load(path, weights_only=True) for path in reported]
    return report


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

    # Every rank reports the whole model's sparsity and pruned layers, as one process does.
    (expected,) = single["reported"]
    assert len(report["reported"]) == 2
    assert set(expected["sparse"].values()) == {"2:4 sparse"}
    for reported in report["reported"]:
        assert reported["sparse"] == expected["sparse"]
        assert reported["compressed"] == expected["compressed"]
        assert reported["sparsity"].keys() == expected["sparsity"].keys()
        # Zeros beyond the masks are weights fake-quantized to their zero point: float
        # rounding may move one of them across a rounding boundary (1/2048 of the smallest
        # layer); measured, the counts agree exactly.
        for name, sparsity in expected["sparsity"].items():
            assert reported["sparsity"][name] == pytest.approx(sparsity, abs=1e-3), name


def int4_codes(packed: torch.Tensor) -> torch.Tensor:
    """The eight 4-bit codes of each int32 of a ``pack-quantized`` weight."""
    return torch.stack([(packed >> (4 * i)) & 15 for i in range(8)], dim=-1)


@pytest.mark.slow  # a one-process and a 2-process run, then two reloads: 30 to 90 s
def test_fsdp2_runs_the_one_shot_stage_whole_and_exports_the_one_process_checkpoint(tmp_path):
    launch(EXPORT_SCRIPT, "single", tmp_path / "single")
    launch(EXPORT_SCRIPT, "fsdp2", tmp_path / "fsdp2")
    single, sharded = (tmp_path / mode / "checkpoint" for mode in ("single", "fsdp2"))
    report = torch.load(tmp_path / "fsdp2" / "report.pt", weights_only=True)
    # GPTQ ran once, before the first step, on the whole model (each rank, before sharding).
    assert report == {"one_shot_steps": [0], "sharded": True}

    assert (sharded / "config.json").read_text() == (single / "config.json").read_text()
    expected = load_file(single / "model.safetensors")
    saved = load_file(sharded / "model.safetensors")
    assert saved.keys() == expected.keys()
    assert any(name.endswith("weight_packed") for name in saved)
    for name, tensor in expected.items():
        if name.endswith("weight_packed"):
            # One SGD step from the same GPTQ weights on the fixed GPTQ grid: the runs'
            # gradients agree up to float rounding, which can move a weight lying on a
            # rounding boundary to the neighbouring code, and nothing more.
            diff = (int4_codes(saved[name]) - int4_codes(tensor)).abs()
            assert diff.max() <= 1 and diff.count_nonzero() <= diff.numel() // 1000, name
        elif tensor.is_floating_point():
            torch.testing.assert_close(saved[name], tensor, rtol=0, atol=1e-6, msg=name)
        else:
            assert torch.equal(saved[name], tensor), name

    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    logits = [AutoModelForCausalLM.from_pretrained(path)(ids).logits for path in (single, sharded)]
    torch.testing.assert_close(logits[1], logits[0], rtol=0, atol=1e-4)
