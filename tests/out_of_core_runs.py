"""What the out-of-core tests share: recipes, settings, data and the checkpoint comparison."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_compress.modifiers import (
    AWQModifier,
    GPTQModifier,
    QuantizationModifier,
    SparseGPTModifier,
)

W4_G16 = {"num_bits": 4, "strategy": "group", "group_size": 16}
W4_GROUPS = {"w4": {"targets": ["Linear"], "weights": W4_G16}}
RECIPES = {
    "rtn": lambda: [QuantizationModifier(config_groups=W4_GROUPS)],
    "gptq": lambda: [GPTQModifier(config_groups=W4_GROUPS)],
    "sparsegpt": lambda: [SparseGPTModifier(sparsity=0.5, mask_structure="2:4")],
    "awq_rtn": lambda: [
        AWQModifier(weights=W4_G16, ignore=["lm_head"]),
        QuantizationModifier(config_groups=W4_GROUPS, ignore=["lm_head"]),
    ],
    "sparsegpt_then_gptq": lambda: [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"]),
        GPTQModifier(config_groups=W4_GROUPS, ignore=["lm_head"]),
    ],
}
SETTINGS = {
    "num_calibration_samples": 4,
    "batch_size": 2,
    "progress": False,
    "trainer_kwargs": {"accelerator": "cpu"},
}


def token_ids() -> torch.Tensor:
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_same_checkpoint(expected: Path, actual: Path) -> None:
    want, got = checkpoint_tensors(expected), checkpoint_tensors(actual)
    assert sorted(got) == sorted(want)
    different = [name for name in want if not torch.equal(want[name], got[name])]
    assert not different, f"tensors differ: {different}"
    config = json.loads((actual / "config.json").read_text())
    assert config == json.loads((expected / "config.json").read_text())
