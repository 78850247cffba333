"""The QAD benchmark's trained rows: one Trainer.fit each, the GPTQ stage inside it equal to the
benchmark's GPTQ row, training on GPTQ's grid, and the table's share of GPTQ's gap closed.

Run on a two-block Llama (random weights, 64-token vocabulary), two steps each: the script's
own functions, as ``benchmarks/qad_smollm2.py`` calls them.
"""

from __future__ import annotations

import argparse
import copy

import pytest
import torch

STEPS = 2
SEQ_LEN = 512  # the script's window length


@pytest.fixture
def script(benchmark_script):
    """``benchmarks/qad_smollm2.py``, imported as the script runs."""
    return benchmark_script("qad_smollm2")


@pytest.fixture
def tiny_llama(random_llama):
    """Two decoder blocks of hidden size 64 (one W4 g64 group per row), random weights."""
    return random_llama(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


def _args(**overrides) -> argparse.Namespace:
    settings = {"scheme": "w4a16_g64", "steps": STEPS, "batch": 1, "lr": 1e-2, "seed": 0}
    settings["hardness"] = 0.5
    settings.update(holdout=2, **overrides)
    return argparse.Namespace(**settings)


def _windows() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (6, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return {"train_and_holdout": ids, "calibration": ids[:2]}


def _scales(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: module.weight_scale.detach().clone()
        for name, module in model.named_modules()
        if hasattr(module, "weight_scale")
    }


@pytest.mark.parametrize("kind", ["gptq_qat", "gptq_qad"])
def test_trained_row_runs_gptq_in_the_fit_and_trains_on_its_grid(script, tiny_llama, kind):
    windows = _windows()
    gptq = copy.deepcopy(tiny_llama)
    script.one_shot(gptq, "w4a16_g64", "gptq", windows["calibration"])
    trained = copy.deepcopy(tiny_llama)

    measured = script.train(trained, kind, windows, _args())

    assert measured["fit_s"] > 0 and measured["s_per_step"] > 0 and measured["cpu_s_per_step"] > 0
    scales, gptq_scales = _scales(trained), _scales(gptq)
    assert scales.keys() == gptq_scales.keys() and len(scales) == 14  # every Linear but lm_head
    moved = 0
    for name, scale in scales.items():
        torch.testing.assert_close(scale, gptq_scales[name])  # the GPTQ row's grid, kept
        weight = trained.get_submodule(name).weight
        codes = weight.unflatten(1, (scale.shape[1], -1)) / scale.unsqueeze(-1)  # groups of 64
        torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)
        moved += int((weight != gptq.get_submodule(name).weight).sum())
    assert moved > 0  # training changed codes, within the grid


def test_plain_fine_tune_row_trains_the_float_model_without_compression(script, tiny_llama):
    before = copy.deepcopy(tiny_llama.state_dict())
    script.train(tiny_llama, "fp_ft", _windows(), _args())
    assert not _scales(tiny_llama)
    assert any(
        not torch.equal(before[key], value) for key, value in tiny_llama.state_dict().items()
    )


def test_qad_recipe_distils_from_the_uncompressed_model_with_kl_and_block_mse(script):
    from lightning_compress.modifiers import OutputDistillationModifier

    (distillation,) = [
        m
        for m in script.recipe("gptq_qad", "w4a16_g64")
        if isinstance(m, OutputDistillationModifier)
    ]
    assert distillation.layer_targets == ["LlamaDecoderLayer"]
    assert (distillation.temperature, distillation.hardness) == (1.0, 0.5)
    (distil_only,) = [
        m
        for m in script.recipe("gptq_qad", "w4a16_g64", hardness=1.0)
        if isinstance(m, OutputDistillationModifier)
    ]
    assert distil_only.hardness == 1.0
    assert not any(
        isinstance(m, OutputDistillationModifier) for m in script.recipe("gptq_qat", "w4a16_g64")
    )


def test_table_shows_the_share_of_gptqs_gap_each_row_closes(script, capsys):
    def row(run, austen, **extra):
        return {"run": run, "train_tokens": 0, "austen": austen, "bible": 9.0, "holdout": 40.0,
                "rss_peak_mib": 1000.0, **extra}  # fmt: skip

    rows = [row("fp", 40.0), row("gptq", 44.0), row("gptq_qad", 41.0, cpu_s_per_step=2.5)]
    script.print_table(rows, _args(threads=1))
    lines = capsys.readouterr().out.splitlines()
    assert "| gptq |  | 0 | 44.00 | 0% | 9.00 | 40.00 | - | 1000 |" in lines
    assert "| gptq_qad |  | 0 | 41.00 | 75% | 9.00 | 40.00 | 2.50 | 1000 |" in lines


def test_table_tells_rows_of_one_run_apart_by_the_settings_in_which_they_differ(script, capsys):
    def row(austen, **extra):
        return {"run": "gptq_qad", "train_tokens": 20480, "austen": austen, "bible": 11.0,
                "holdout": 38.0, "rss_peak_mib": 6000.0, "cpu_s_per_step": 8.5, "steps": 40,
                "lr": 3e-4, **extra}  # fmt: skip

    saved_before_hardness = row(38.9)  # no hardness or seed recorded: 0.5 and 0
    rows = [saved_before_hardness, row(39.5, hardness=1.0, seed=0), row(39.2, hardness=0.75)]
    script.print_table(rows, _args(threads=1))
    lines = capsys.readouterr().out.splitlines()
    assert (
        "| gptq_qad, hardness 0.5 | 0.5 | 20,480 | 38.90 |  | 11.00 | 38.00 | 8.50 | 6000 |"
        in lines
    )
    assert "| gptq_qad, hardness 1 | 1 | 20,480 | 39.50 |  | 11.00 | 38.00 | 8.50 | 6000 |" in lines
    assert any(line.startswith("| gptq_qad, hardness 0.75 | 0.75 |") for line in lines)


def test_hardness_outside_zero_to_one_is_refused_naming_the_option(script, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["qad_smollm2.py", "--hardness", "1.5"])
    with pytest.raises(SystemExit):
        script.parse_args()
    assert "--hardness: expected a weight in [0, 1], got 1.5" in capsys.readouterr().err
