"""The recipes of the architecture matrix, each run once per architecture and remembered.

A run compresses a tiny model (:mod:`tiny_models`) one-shot or in a few training steps, with
``strict=True`` (a recipe that leaves a decoder weight out is refused), saves the checkpoint,
and keeps what the checks of ``test_matrix.py`` read: the weight matrices of the decoder blocks
before compression, the model after it, the checkpoint and the run's summary.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from architectures.tiny_models import ROUTERS, block_matrices, tiny_model, token_ids
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.export import save_compressed
from lightning_compress.lightning import Compressor
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import (
    AWQModifier,
    GPTQModifier,
    Modifier,
    QuantizationModifier,
    SmoothQuantModifier,
    SparseGPTModifier,
)
from lightning_compress.summary import CompressionSummary

GROUP_SIZE = 32
W4_GROUP = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE}
QUIET = {"enable_progress_bar": False, "logger": False}
TRAINING_STEPS = 3
_CHECKPOINTS = tempfile.TemporaryDirectory(prefix="architecture-matrix-")
"""Where the runs save their checkpoints; removed when the test process ends."""


def ignored(kind: str) -> list[str]:
    """What every recipe leaves out on purpose: the LM head and the routers.

    ``lm_head`` as the reference project's recipes write it: inside the ``Compressor`` it
    selects ``model.lm_head`` of the LightningModule.
    """
    return ["lm_head", *ROUTERS.get(kind, [])]


def _w4(kind: str) -> dict:
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": W4_GROUP}}}


def gptq_w4(kind: str) -> list[Modifier]:
    """GPTQ, 4-bit symmetric weights in groups of 32."""
    return [GPTQModifier(**_w4(kind), ignore=ignored(kind))]


def sparsegpt_2of4(kind: str) -> list[Modifier]:
    """SparseGPT, 2 of every 4 input weights zero."""
    return [SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=ignored(kind))]


def awq_rtn_w4(kind: str) -> list[Modifier]:
    """AWQ scales, then round-to-nearest 4-bit weights in groups of 32."""
    return [
        AWQModifier(weights=W4_GROUP, ignore=ignored(kind)),
        QuantizationModifier(**_w4(kind), ignore=ignored(kind)),
    ]


def smoothquant_w8a8(kind: str) -> list[Modifier]:
    """SmoothQuant, then round-to-nearest int8 weights per channel and int8 tokens."""
    return [
        SmoothQuantModifier(smoothing_strength=0.8, ignore=ignored(kind)),
        QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignored(kind)),
    ]


def qat_w4(kind: str) -> list[Modifier]:
    """Quantization-aware training from the first step, 4-bit weights in groups of 32."""
    return [QuantizationModifier(**_w4(kind), ignore=ignored(kind), start=0)]


RECIPES: dict[str, Callable[[str], list[Modifier]]] = {
    "gptq_w4": gptq_w4,
    "sparsegpt_2of4": sparsegpt_2of4,
    "awq_rtn_w4": awq_rtn_w4,
    "smoothquant_w8a8": smoothquant_w8a8,
    "qat_w4": qat_w4,
}
TRAINING = frozenset({"qat_w4"})


@dataclass
class Run:
    """One compressed tiny model.

    Args:
        kind: the architecture.
        recipe: the key of :data:`RECIPES`.
        before: the decoder blocks' weight matrices before compression (copies).
        model: the compressed model, in eval mode.
        checkpoint: the saved checkpoint.
        summary: the run's summary (``oneshot``'s or the ``Compressor``'s).
    """

    kind: str
    recipe: str
    before: dict[str, torch.Tensor]
    model: nn.Module
    checkpoint: Path
    summary: CompressionSummary


@functools.cache
def compress(kind: str, recipe: str) -> Run:
    """Compresses the tiny model of ``kind`` with ``recipe`` and saves it (once per pair).

    Args:
        kind: the architecture.
        recipe: a key of :data:`RECIPES`.

    Returns:
        The run.
    """
    model = tiny_model(kind)
    before = {name: matrix.detach().clone() for name, matrix in block_matrices(model).items()}
    checkpoint = Path(_CHECKPOINTS.name) / f"{kind}-{recipe}"
    if recipe in TRAINING:
        summary = _train(model, RECIPES[recipe](kind), checkpoint)
    else:
        summary = CompressionSummary()
        oneshot(
            model,
            RECIPES[recipe](kind),
            token_ids(),
            num_calibration_samples=8,
            trainer_kwargs=QUIET,
            summary=summary,
            strict=True,
        )
        save_compressed(model, checkpoint, progress=False)
    return Run(kind, recipe, before, model.eval(), checkpoint, summary)


def _train(model: nn.Module, recipe: list[Modifier], checkpoint: Path) -> CompressionSummary:
    compressor = Compressor(recipe, save_dir=checkpoint, strict=True)
    module = CausalLMModule(model.train(), lr=1e-3)
    trainer = Trainer(
        accelerator="cpu",
        max_steps=TRAINING_STEPS,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[compressor],
        **QUIET,
    )
    trainer.fit(module, DataLoader(token_ids(12, 16, seed=2), batch_size=4))
    return compressor.summary
