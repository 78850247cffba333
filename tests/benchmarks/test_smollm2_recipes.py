"""Every run of the SmolLM2 benchmark builds a valid recipe on both sides, without the model.

Ours is planned on a one-block random Llama with SmolLM2-135M's widths (576 hidden, 1536
intermediate, 9 query and 3 key/value heads), so a group size that does not divide its layers
fails here rather than in the middle of a benchmark sitting. llm-compressor's side is built
with our classes standing in for its own (the names and arguments the compatible API shares);
``python -m pytest -m reference tests/benchmarks`` with ``SMOLLM2_REFERENCE_PYTHON`` set to the
python of llm-compressor's environment also builds it with its own classes and resolves its
quantization configs.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from lightning_compress import modifiers as ours

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_PYTHON = os.environ.get("SMOLLM2_REFERENCE_PYTHON")
# the modules smollm2_reference.recipe imports its classes from
REFERENCE_MODULES = {
    "llmcompressor.modifiers.obcq": ["SparseGPTModifier"],
    "llmcompressor.modifiers.pruning": ["WandaPruningModifier"],
    "llmcompressor.modifiers.quantization": ["GPTQModifier", "QuantizationModifier"],
    "llmcompressor.modifiers.smoothquant": ["SmoothQuantModifier"],
    "llmcompressor.modifiers.transform": ["AWQModifier"],
}


@pytest.fixture
def benchmark(monkeypatch):
    """``benchmarks/smollm2.py`` and ``smollm2_reference.py``, imported as the scripts do."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    return importlib.import_module("smollm2"), importlib.import_module("smollm2_reference")


@pytest.fixture
def smollm2_shaped_llama():
    """One decoder block with SmolLM2-135M's layer widths, random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def reference_with_our_classes(monkeypatch, benchmark):
    """``smollm2_reference.recipe`` with our modifier classes in llm-compressor's modules."""
    for name, classes in REFERENCE_MODULES.items():
        module = types.ModuleType(name)
        for cls in classes:
            setattr(module, cls, getattr(ours, cls))
        monkeypatch.setitem(sys.modules, name, module)
    return benchmark[1].recipe


def _plan(modifier, model) -> None:
    """Plan ``modifier`` on ``model`` as ``oneshot`` would (layers, then attention states)."""
    if hasattr(modifier, "plan_layers"):
        modifier.plan_layers(model)
    if hasattr(modifier, "attention_plan"):
        modifier.attention_plan(model)


def test_every_reference_run_is_one_of_ours(benchmark):
    smollm2, reference = benchmark
    assert set(reference.RUNS) <= set(smollm2.RUNS)
    assert set(reference.SCHEME_RUNS) <= set(reference.RUNS)


def test_every_run_of_ours_plans_on_smollm2_widths(benchmark, smollm2_shaped_llama):
    smollm2, _ = benchmark
    for run in smollm2.RUNS:
        modifiers = smollm2.recipe(run)
        assert (run == "fp") == (not modifiers), run
        for modifier in modifiers:
            _plan(modifier, smollm2_shaped_llama)


def test_the_preset_w4afp8_groups_do_not_divide_smollm2_so_the_run_uses_groups_of_64(
    benchmark, smollm2_shaped_llama
):
    from lightning_compress.recipe.errors import RecipeError

    preset = ours.QuantizationModifier(scheme="W4AFP8", targets=["Linear"], ignore=["lm_head"])
    with pytest.raises(RecipeError, match=r"group_size \[128\] does not divide.*in_features=576"):
        preset.plan_layers(smollm2_shaped_llama)
    _, reference = benchmark
    _, arguments = reference.SCHEME_RUNS["rtn_w4afp8_g64"]
    (group,) = arguments["config_groups"].values()
    assert group["weights"]["group_size"] == 64


def test_every_reference_run_builds_with_the_shared_api(
    benchmark, reference_with_our_classes, smollm2_shaped_llama
):
    smollm2, reference = benchmark
    for run in reference.RUNS:
        built = reference_with_our_classes(run)
        assert [type(m) for m in built] == [type(m) for m in smollm2.recipe(run)], run
        for modifier in built:
            _plan(modifier, smollm2_shaped_llama)


def test_scheme_runs_build_the_same_modifier_on_both_sides(benchmark, reference_with_our_classes):
    smollm2, reference = benchmark
    for run in reference.SCHEME_RUNS:
        (theirs,) = reference_with_our_classes(run)
        (mine,) = smollm2.recipe(run)
        assert theirs.resolved_schemes() == mine.resolved_schemes(), run
        assert theirs.kv_cache_args() == mine.kv_cache_args(), run
    for observer in reference.KV_OBSERVERS:
        (theirs,) = reference_with_our_classes("fp8_kv", observer)
        (mine,) = smollm2.recipe("fp8_kv", kv_observer=observer)
        assert theirs.kv_cache_args() == mine.kv_cache_args()
        assert mine.kv_cache_args().observer == observer


@pytest.mark.reference
def test_every_reference_run_builds_and_resolves_in_llm_compressor(benchmark):
    assert REFERENCE_PYTHON, "set SMOLLM2_REFERENCE_PYTHON to the python of llm-compressor's venv"
    check = (
        "from smollm2_reference import RUNS, recipe\n"
        "for run in RUNS:\n"
        "    for modifier in recipe(run):\n"
        "        if hasattr(modifier, 'resolve_quantization_config'):\n"
        "            modifier.resolve_quantization_config()\n"
        "print('built', len(RUNS))\n"
    )
    done = subprocess.run(
        [REFERENCE_PYTHON, "-c", check],
        cwd=ROOT / "benchmarks",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith(f"built {len(benchmark[1].RUNS)}")


def test_the_fp8_kv_run_is_scored_with_fp8_keys_and_values(benchmark, smollm2_shaped_llama):
    from lightning_compress import oneshot

    smollm2, _ = benchmark
    model = smollm2_shaped_llama
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    oneshot(model, smollm2.recipe("fp8_kv"), dataset=ids, num_calibration_samples=2, device="cpu")
    with torch.no_grad():
        plain = model(ids).logits
        with smollm2._quantized_states(model):
            scored = model(ids).logits
        after = model(ids).logits
    assert not torch.equal(scored, plain)
    assert torch.equal(after, plain)


def test_our_scheme_runs_take_the_calibration_activations_and_kv_observer(benchmark):
    smollm2, _ = benchmark
    (default,) = smollm2.recipe("gptq_nvfp4")
    (unquantized,) = smollm2.recipe("gptq_nvfp4", "float")
    (quantized,) = smollm2.recipe("gptq_nvfp4", "quantized")
    assert (
        default.quantize_activations_in_calibration
        and quantized.quantize_activations_in_calibration
    )
    assert not unquantized.quantize_activations_in_calibration
    (kv,) = smollm2.recipe("fp8_kv", kv_observer="moving_average")
    assert kv.kv_cache_scheme["observer"] == "moving_average"
    assert "observer" not in smollm2.recipe("fp8_kv")[0].kv_cache_scheme
