"""Kill a compressing run mid-way, resume from its last checkpoint: same result as no kill."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("resume_run.py")

RECIPES = {
    "gradual_pruning": """
prune_stage:
  pruning_modifiers:
    MagnitudePruningModifier:
      targets: [fc1, fc2]
      init_sparsity: 0.1
      final_sparsity: 0.7
      start: 0
      end: 8
      update: 2
""",
    "qat_static_int8_inputs": """
qat_stage:
  quant_modifiers:
    QuantizationModifier:
      start: 2
      end: 10
      freeze_observers: 8
      config_groups:
        g:
          targets: [Linear]
          weights: {num_bits: 4, strategy: group, group_size: 16}
          input_activations: {num_bits: 8, symmetric: false, observer: moving_average}
""",
}


def run(recipe: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(recipe), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_kill_and_resume_equals_uninterrupted(tmp_path, name):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES[name])
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = run(recipe, whole)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = run(recipe, broken, "--kill-after", "5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert (broken / "last.ckpt").exists() and not (broken / "final.pt").exists()
    resumed = run(recipe, broken, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = torch.load(whole / "final.pt", weights_only=True)
    actual = torch.load(broken / "final.pt", weights_only=True)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_callback_state_is_primitive_and_refuses_another_recipe(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPES["gradual_pruning"])
    out = tmp_path / "run"
    killed = run(recipe, out, "--kill-after", "3")
    assert killed.returncode == -9
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("Compressor")]
    assert "MagnitudePruningModifier" in state["recipe"] and state["global_step"] >= 2
    recipe.write_text(RECIPES["gradual_pruning"].replace("0.7", "0.6"))
    resumed = run(recipe, out, "--resume")
    assert resumed.returncode != 0
    assert "different recipe" in resumed.stderr
