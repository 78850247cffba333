"""Quantization-aware training with learned (LSQ) versus min-max weight scales.

Fine-tunes fresh copies of the bundled model for the same number of steps with weights
fake-quantized to symmetric int ``bits`` in groups of 64, once with scales that follow each
weight's min-max (``learnable_scales: false``) and once with scales the optimizer trains
(``learnable_scales: true``, in their own AdamW group at ``--scale-lr``), and prints their
held-out perplexity on the bundled evaluation text beside round-to-nearest without training,
as a Markdown table.

    python benchmarks/learnable_scales.py [--steps 150] [--bits 4 3 2] [--scale-lr 1e-5]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from lightning.pytorch import Trainer
from torch import nn
from training_quality import BATCH_SIZE, TRAIN_WINDOWS, evaluation_setup, one_shot, weights

from lightning_compress import Compressor
from lightning_compress.bundled import (
    perplexity,
)
from lightning_compress.lightning.language_model import BundledTextDataModule, CausalLMModule
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization.learnable import learned_scale_parameters

LR = 3e-4


class ScaleGroupLM(CausalLMModule):
    """:class:`CausalLMModule` whose learned scales have their own learning rate."""

    def __init__(self, model: nn.Module, scale_lr: float) -> None:
        super().__init__(model, lr=LR)
        self.scale_lr = scale_lr

    def configure_optimizers(self) -> torch.optim.Optimizer:
        scales = learned_scale_parameters(self)
        others = [p for p in self.parameters() if all(p is not s for s in scales)]
        groups = [{"params": others}]
        if scales:
            groups.append({"params": scales, "lr": self.scale_lr})
        return torch.optim.AdamW(groups, lr=self.lr, weight_decay=0.0)


def train(model: nn.Module, steps: int, qat: QuantizationModifier, scale_lr: float) -> None:
    """Fine-tune ``model`` on the bundled text for ``steps`` steps under ``qat``."""
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[Compressor([qat])],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    data = BundledTextDataModule(train_windows=TRAIN_WINDOWS, batch_size=BATCH_SIZE)
    trainer.fit(ScaleGroupLM(model, scale_lr), data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=150, help="fine-tuning steps per run")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--scale-lr", type=float, default=1e-5, help="AdamW lr of the scales")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--windows", type=int, default=16, help="evaluation windows of 256")
    args = parser.parse_args()
    windows, base = evaluation_setup(args.threads, args.windows)
    print(
        f"| int g64 | RTN | QAT min-max scales | QAT learned scales (lr {args.scale_lr:g}) "
        f"| seconds ({args.steps} steps of {BATCH_SIZE}x256 tokens, lr {LR:g}) |"
    )
    print("|---|---:|---:|---:|---|")
    for bits in args.bits:
        groups = weights(bits, 64)
        results, seconds = [], []
        for learnable in (None, False, True):
            torch.manual_seed(0)
            model = copy.deepcopy(base).train()
            begin = time.perf_counter()
            if learnable is None:
                one_shot(model, QuantizationModifier(config_groups=groups))
            else:
                qat = QuantizationModifier(
                    config_groups=groups, start=0, learnable_scales=learnable
                )
                train(model, args.steps, qat, args.scale_lr)
            seconds.append(time.perf_counter() - begin)
            results.append(perplexity(model, windows))
        times = " / ".join(f"{s:.0f}" for s in seconds[1:])
        print(
            f"| int{bits} | {results[0]:.3f} | {results[1]:.3f} | {results[2]:.3f} | {times} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
