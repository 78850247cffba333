"""Every weight matrix of the decoder blocks of 23 architectures is compressed, saved and reloaded.

Each architecture of :mod:`tiny_models` runs through each recipe of :mod:`compression_runs`
(GPTQ W4, SparseGPT 2:4, AWQ then RTN W4, SmoothQuant then W8A8, a few steps of quantization-aware
training). The default run takes one recipe per architecture, in turn; ``-m slow`` runs the
rest of the matrix. The checks read the weights themselves, not the project's bookkeeping:

* every matrix of the decoder blocks but the routers lies on the recipe's grid (at most 16
  values in each group of 32 weights of a row for W4, a symmetric int8 grid per row for W8,
  two zeros in every four input weights for 2:4), in memory and in the checkpoint, and no weight
  went missing; the routers and the LM head, ignored, are not compressed;
* the checkpoint gives the logits of the model in memory, loaded by transformers and by
  ``load_compressed``;
* the run's coverage summary counts every weight of the decoder blocks compressed but the
  routers, which it counts ignored, and leaves nothing out.
"""

from __future__ import annotations

from itertools import cycle

import pytest
import torch
from architectures.compression_runs import RECIPES, TRAINING, Run, compress
from architectures.tiny_models import ARCHITECTURES, block_matrices, is_router, token_ids
from loguru import logger
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

from lightning_compress.export import load_compressed

PROBE = token_ids(2, 10, seed=4)
LOGITS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
INT8_GRID_TOLERANCE = 1e-3

TOKEN_SCALES_2D = (
    "compressed-tensors' dynamic per-token activation quantization keeps dimensions 0 and 1 "
    "of its input, so a layer fed [tokens, hidden] (OPT's MLP) gets one scale per element in "
    "transformers; the project quantizes per token (row), as vLLM does"
)
CONV1D_IN_TRANSFORMERS = (
    "transformers' compressed-tensors integration quantizes nn.Linear layers only, so GPT-2's "
    "Conv1D layers do not take the quantized tensors of the checkpoint"
)
FALCON_PACKED = (
    "transformers' Falcon initializes FalconLinear.weight, which a pack-quantized layer "
    "loaded compressed no longer has; quantization_config=CompressedTensorsConfig("
    "dequantize=True) loads it with the same logits"
)
EXPERT_NAMES = (
    "the checkpoint names experts mlp.experts.<e>.gate_proj/up_proj/down_proj; transformers 5 "
    "reads Granite-MoE's fused as block_sparse_moe.input_linear/output_linear and gpt-oss's "
    "fused as experts.gate_up_proj/down_proj, so it initializes the experts afresh"
)
INT8_EXPERTS = (
    "transformers 5.25 dequantizes per-expert checkpoint tensors into its fused experts from "
    "FP8 or packed int weights only, not from int8 (int-quantized) ones"
)
PACKED = ("gptq_w4", "awq_rtn_w4", "qat_w4")
TRANSFORMERS_FAILURES: dict[str, dict[str, str]] = {
    "opt": {"smoothquant_w8a8": TOKEN_SCALES_2D},
    "gpt2": {recipe: CONV1D_IN_TRANSFORMERS for recipe in RECIPES if recipe != "sparsegpt_2of4"},
    "falcon": dict.fromkeys(PACKED, FALCON_PACKED),
    **{kind: dict.fromkeys(RECIPES, EXPERT_NAMES) for kind in ("granitemoe", "gpt_oss")},
    **{
        kind: {"smoothquant_w8a8": INT8_EXPERTS}
        for kind in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")
    },
}
"""Cells whose checkpoint transformers does not load with the logits of the model in memory."""


def expected_failure(kind: str, recipe: str, check: str) -> str | None:
    """Why one cell of the matrix fails, or None where it passes."""
    if check == "transformers":
        return TRANSFORMERS_FAILURES.get(kind, {}).get(recipe)
    return None


def _default_recipes() -> dict[str, str]:
    recipes = cycle(RECIPES)
    return {kind: next(recipes) for kind in ARCHITECTURES}


DEFAULT = _default_recipes()
"""The one recipe of each architecture that the default run takes."""


def cells(check: str) -> list:
    """Every (architecture, recipe) pair, marked slow off the default run and xfail where known."""
    params = []
    for kind in ARCHITECTURES:
        for recipe in RECIPES:
            marks = [] if DEFAULT[kind] == recipe else [pytest.mark.slow]
            reason = expected_failure(kind, recipe, check)
            if reason is not None:
                marks.append(pytest.mark.xfail(strict=True, reason=reason))
            params.append(pytest.param(kind, recipe, marks=marks, id=f"{kind}-{recipe}"))
    return params


@pytest.fixture(autouse=True)
def quiet_log():
    """The library logs per-layer metrics; keep test output readable."""
    logger.disable("lightning_compress")
    yield
    logger.enable("lightning_compress")


def follows_2_4(matrix: torch.Tensor) -> bool:
    """At most 2 non-zero weights in every 4 consecutive input weights of a row."""
    rows, columns = matrix.shape
    return bool(((matrix.reshape(rows, columns // 4, 4) != 0).sum(-1) <= 2).all())


def on_int4_groups(matrix: torch.Tensor, group_size: int = 32) -> bool:
    """At most 16 distinct values in every group of ``group_size`` input weights of a row."""
    rows, columns = matrix.shape
    ordered = matrix.reshape(rows, columns // group_size, group_size).sort(-1).values
    distinct = 1 + (ordered.diff(dim=-1) != 0).sum(-1)
    return bool((distinct <= 16).all())


def on_int8_rows(matrix: torch.Tensor) -> bool:
    """Each row is a symmetric int8 grid: its largest magnitude is 127 or 128 steps."""
    largest = matrix.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(matrix.dtype).tiny)
    rows_on_grid = torch.zeros(matrix.shape[0], dtype=torch.bool)
    for steps in (127, 128):
        codes = matrix / largest * steps
        rows_on_grid |= ((codes - codes.round()).abs() <= INT8_GRID_TOLERANCE).all(dim=1)
    return bool(rows_on_grid.all())


def is_compressed(matrix: torch.Tensor, recipe: str) -> bool:
    """Whether one ``[out, in]`` matrix holds what ``recipe`` makes of a weight."""
    matrix = matrix.detach().float()
    if recipe == "sparsegpt_2of4":
        return follows_2_4(matrix)
    if recipe == "smoothquant_w8a8":
        return on_int8_rows(matrix)
    return on_int4_groups(matrix)


def check_every_weight_compressed(run: Run, model: nn.Module, where: str) -> None:
    """Every block matrix of ``model`` but the routers is compressed, none is missing."""
    matrices = block_matrices(model)
    expected = sum(m.numel() for n, m in run.before.items() if not is_router(n, run.kind))
    found = {n: m for n, m in matrices.items() if not is_router(n, run.kind)}
    assert sum(m.numel() for m in found.values()) == expected, f"{where}: weights went missing"
    left = [name for name, matrix in found.items() if not is_compressed(matrix, run.recipe)]
    assert not left, f"{where}: {len(left)} of {len(found)} matrices not compressed: {left}"
    routers = [n for n, m in matrices.items() if is_router(n, run.kind)]
    routers = [name for name in routers if is_compressed(matrices[name], run.recipe)]
    assert not routers, f"{where}: routers compressed: {routers}"
    head = model.get_output_embeddings().weight
    assert not is_compressed(head, run.recipe), f"{where}: the ignored LM head is compressed"


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROBE).logits


@pytest.mark.parametrize(("kind", "recipe"), cells("compressed"))
def test_every_block_weight_is_compressed(kind, recipe):
    run = compress(kind, recipe)
    if recipe not in TRAINING:
        check_every_weight_compressed(run, run.model, "in memory")
    dense = load_compressed(run.checkpoint, keep_quantization=False)
    check_every_weight_compressed(run, dense, "in the checkpoint")


@pytest.mark.parametrize(("kind", "recipe"), cells("transformers"))
def test_transformers_loads_the_logits_of_the_compressed_model(kind, recipe):
    run = compress(kind, recipe)
    loaded = AutoModelForCausalLM.from_pretrained(run.checkpoint)
    torch.testing.assert_close(logits(loaded), logits(run.model), **LOGITS_TOLERANCE)


@pytest.mark.parametrize(("kind", "recipe"), cells("load_compressed"))
def test_load_compressed_gives_the_logits_of_the_compressed_model(kind, recipe):
    run = compress(kind, recipe)
    loaded = load_compressed(run.checkpoint)
    torch.testing.assert_close(logits(loaded), logits(run.model), **LOGITS_TOLERANCE)


@pytest.mark.parametrize(("kind", "recipe"), cells("summary"))
def test_coverage_summary_says_every_block_weight_is_compressed(kind, recipe):
    run = compress(kind, recipe)
    coverage = run.summary.coverage
    assert coverage is not None, "the run's summary has no coverage"
    routers = sum(m.numel() for n, m in run.before.items() if is_router(n, kind))
    weights = sum(m.numel() for m in run.before.values()) - routers
    assert coverage.left_out == {}
    assert coverage.elements_of(coverage.compressed) == weights
    assert coverage.elements_of(coverage.ignored) == routers


@pytest.mark.parametrize(
    "recipe",
    [r if DEFAULT["falcon"] == r else pytest.param(r, marks=pytest.mark.slow) for r in PACKED],
)
def test_transformers_loads_falcon_packed_checkpoints_dequantized(recipe):
    run = compress("falcon", recipe)
    loaded = AutoModelForCausalLM.from_pretrained(
        run.checkpoint, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    torch.testing.assert_close(logits(loaded), logits(run.model), **LOGITS_TOLERANCE)
