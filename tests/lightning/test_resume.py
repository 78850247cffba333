"""Kill a compressing run mid-way, resume from its last checkpoint: same result as no kill."""

from __future__ import annotations

import pytest
import torch
from resume_runs import killed_run, train

from lightning_compress.recipe import RecipeError

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


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_kill_and_resume_equals_uninterrupted(tmp_path, name):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    expected = train(RECIPES[name], whole)
    assert killed_run(RECIPES[name], broken, kill_after=5) == -9
    assert (broken / "last.ckpt").exists() and not (broken / "final.pt").exists()
    actual = train(RECIPES[name], broken, resume=True)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_callback_state_is_primitive_and_refuses_another_recipe(tmp_path):
    out = tmp_path / "run"
    train(RECIPES["gradual_pruning"], out, max_steps=3)
    checkpoint = torch.load(out / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("Compressor")]
    assert "MagnitudePruningModifier" in state["recipe"] and state["global_step"] >= 2
    with pytest.raises(RecipeError, match="different recipe"):
        train(RECIPES["gradual_pruning"].replace("0.7", "0.6"), out, resume=True)
