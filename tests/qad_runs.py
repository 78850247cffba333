"""A tiny causal LM distilled from its uncompressed copy while it trains with QAT, runnable as a
script by the kill-and-resume test of quantization-aware distillation.

``python qad_runs.py OUT_DIR [--kill-after N] [--resume]`` writes the final model state to
``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import KillAfter, quiet_trainer  # noqa: E402

from lightning_compress import Compressor  # noqa: E402
from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig  # noqa: E402
from lightning_compress.lightning.language_model import CausalLMModule  # noqa: E402
from lightning_compress.modifiers import (  # noqa: E402
    OutputDistillationModifier,
    QuantizationModifier,
)

CONFIG = TinyDecoderConfig(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1, vocab_size=64
)
BLOCKS = "DecoderLayer"
# W4 g16 on every Linear (the recipes leave lm_head out).
W4 = {"num_bits": 4, "strategy": "group", "group_size": 16}
W4_G16 = {"g": {"targets": ["Linear"], "weights": W4}}
STEPS = 6


def tiny_lm(lr: float = 1e-2) -> CausalLMModule:
    """A seeded tiny decoder (2 blocks, vocabulary 64) under next-token training."""
    torch.manual_seed(0)
    return CausalLMModule(TinyDecoder(CONFIG), lr=lr)


def token_loader(batch_size: int = 4, samples: int = 16) -> DataLoader:
    """Fixed random token windows, in order."""
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, CONFIG.vocab_size, (samples, 17), generator=generator)
    return DataLoader(data, batch_size=batch_size)


def qad_recipe(**distillation: Any) -> list:
    """W4 g16 QAT of every Linear but lm_head, distilled (KL + block MSE) from step 0."""
    settings = {"layer_targets": [BLOCKS], "hardness": 0.5, "temperature": 2.0}
    settings.update(distillation)
    return [
        QuantizationModifier(config_groups=W4_G16, ignore=["lm_head"], start=0),
        OutputDistillationModifier(**settings),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    compressor = Compressor(qad_recipe(), teacher="uncompressed", teacher_dtype="bfloat16")
    callbacks = [compressor, ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True)]
    if args.kill_after:
        callbacks.append(KillAfter(args.kill_after))
    # One batch per epoch: a resumed epoch replays exactly the data of an uninterrupted run.
    module = tiny_lm()
    trainer = quiet_trainer(max_steps=STEPS, callbacks=callbacks, enable_checkpointing=True)
    loader = token_loader(batch_size=16)
    trainer.fit(module, loader, ckpt_path=str(out / "last.ckpt") if args.resume else None)
    torch.save(module.model.state_dict(), out / "final.pt")


if __name__ == "__main__":
    main()
