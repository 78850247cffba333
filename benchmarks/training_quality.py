"""Training-aware compression quality on the bundled model: gradual pruning and QAT.

Compares, at equal training budgets, one-shot compression (then fine-tuning with the result
held fixed) with compression during training (gradual magnitude pruning; quantization-aware
training), by held-out perplexity on the bundled evaluation text. Prints a Markdown table.

    python benchmarks/training_quality.py [--steps 150] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch
from lightning.pytorch import Trainer
from loguru import logger
from torch import nn

from lightning_compress import Compressor
from lightning_compress.bundled import (
    bundled_text,
    load_bundled_model,
    load_tokenizer,
    perplexity,
    token_windows,
)
from lightning_compress.core import CompressionSession
from lightning_compress.lightning.language_model import BundledTextDataModule, CausalLMModule
from lightning_compress.modifiers import (
    ConstantPruningModifier,
    MagnitudePruningModifier,
    Modifier,
    QuantizationModifier,
)

LAYERS = [r"re:.*layers\.\d+\..*_proj$"]
TRAIN_WINDOWS = 512
BATCH_SIZE = 8
STEPS_PER_EPOCH = TRAIN_WINDOWS // BATCH_SIZE


def weights(bits: int, group: int) -> dict:
    """A weight-only ``config_groups`` entry: symmetric int ``bits`` in groups of ``group``."""
    return {
        "g": {
            "targets": LAYERS,
            "weights": {"num_bits": bits, "strategy": "group", "group_size": group},
        }
    }


def fine_tune(model: nn.Module, steps: int, modifiers: list[Modifier] | None) -> float:
    """Train ``model`` for ``steps`` steps with an optional Compressor; return seconds."""
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[Compressor(modifiers)] if modifiers else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    begin = time.perf_counter()
    data = BundledTextDataModule(train_windows=TRAIN_WINDOWS, batch_size=BATCH_SIZE)
    trainer.fit(CausalLMModule(model, lr=3e-4), data)
    return time.perf_counter() - begin


def one_shot(model: nn.Module, modifier: Modifier) -> None:
    """Apply a one-shot modifier through the session API."""
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model)
    session.finalize()


def runs(steps: int) -> dict[str, Callable[[nn.Module], None]]:
    """Label → what to do to a fresh copy of the bundled model."""
    # Schedules are in epochs: ramp up over the first 60% of the steps, 15 mask updates.
    epochs = steps / STEPS_PER_EPOCH
    ramp = {"start": 0, "end": 0.6 * epochs, "update": 0.6 * epochs / 15}
    table: dict[str, Callable[[nn.Module], None]] = {
        "dense": lambda m: None,
        f"dense + {steps} fine-tuning steps": lambda m: fine_tune(m, steps, None),
    }
    for sparsity in (0.5, 0.75):
        magnitude = {"targets": LAYERS, "final_sparsity": sparsity}
        table[f"one-shot magnitude {sparsity:.0%}"] = lambda m, k=magnitude: one_shot(
            m, MagnitudePruningModifier(**k)
        )
        table[f"one-shot magnitude {sparsity:.0%} + fixed-mask fine-tuning"] = (
            lambda m, k=magnitude: (
                one_shot(m, MagnitudePruningModifier(**k)),
                fine_tune(m, steps, [ConstantPruningModifier(targets=LAYERS)]),
            )
        )
        table[f"gradual magnitude {sparsity:.0%} during fine-tuning"] = lambda m, k=magnitude: (
            fine_tune(m, steps, [MagnitudePruningModifier(**k, **ramp)])
        )
    for bits in (3, 2):
        groups = weights(bits, 64)
        table[f"RTN int{bits} g64"] = lambda m, g=groups: one_shot(
            m, QuantizationModifier(config_groups=g)
        )
        table[f"{steps} fine-tuning steps, then RTN int{bits} g64"] = lambda m, g=groups: (
            fine_tune(m, steps, None),
            one_shot(m, QuantizationModifier(config_groups=g)),
        )
        table[f"QAT int{bits} g64 during fine-tuning"] = lambda m, g=groups: fine_tune(
            m, steps, [QuantizationModifier(config_groups=g, start=0)]
        )
    return table


def evaluation_setup(threads: int, num_windows: int) -> tuple[torch.Tensor, nn.Module]:
    """Sets the CPU threads and a warnings-only log, then loads the evaluation data and model.

    Args:
        threads: the number of CPU threads torch uses.
        num_windows: the number of 256-token evaluation windows.

    Returns:
        The evaluation windows and the bundled pretrained model.
    """
    torch.set_num_threads(threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    windows = token_windows(bundled_text("evaluation"), load_tokenizer(), 256, num_windows)
    return windows, load_bundled_model()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 256")
    parser.add_argument("--only", default="", help="run only rows whose label contains this")
    args = parser.parse_args()
    windows, base = evaluation_setup(args.threads, args.windows)
    print(f"| run ({args.steps} steps of 8x256 tokens where trained) | perplexity | seconds |")
    print("|---|---:|---:|")
    for label, run in runs(args.steps).items():
        if args.only not in label:
            continue
        torch.manual_seed(0)
        model = copy.deepcopy(base).train()
        begin = time.perf_counter()
        run(model)
        seconds = time.perf_counter() - begin
        print(f"| {label} | {perplexity(model, windows):.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
