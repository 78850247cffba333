"""QAT and pruning of experts inside the Compressor callback; kill and resume is exact."""

from __future__ import annotations

import torch
from resume_runs import killed_run, train

RECIPE = """
prune_stage:
  pruning_modifiers:
    MagnitudePruningModifier:
      targets: ["re:.*experts.*_proj$"]
      init_sparsity: 0.1
      final_sparsity: 0.5
      start: 0
      end: 6
      update: 2
qat_stage:
  quant_modifiers:
    QuantizationModifier:
      start: 2
      end: 8
      freeze_observers: 6
      config_groups:
        g:
          targets: ["re:.*experts.*_proj$"]
          weights: {num_bits: 4, strategy: group, group_size: 16}
          input_activations: {num_bits: 8, symmetric: false, observer: moving_average}
"""


def test_expert_qat_and_pruning_resume_exactly(tmp_path):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    expected = train(RECIPE, whole, model="mixtral")
    assert killed_run(RECIPE, broken, kill_after=4, model="mixtral") == -9
    actual = train(RECIPE, broken, model="mixtral", resume=True)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    down = expected["model.layers.1.mlp.experts.2.down_proj.weight"]
    assert 0.45 <= float((down == 0).float().mean()) <= 0.55
    assert "model.layers.1.mlp.experts.2.down_proj.weight_scale" in expected
    assert "model.layers.1.mlp.experts.2.down_proj.input_zero_point" in expected
