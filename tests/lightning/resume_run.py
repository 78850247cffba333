"""Train a small model with a recipe; optionally die (SIGKILL) after a step, or resume.

Run as a script by the resume tests: ``python resume_run.py RECIPE OUT_DIR [--model
{regressor,mixtral}] [--kill-after N] [--resume]``. Writes the final state of the trained model
(the regressor, or the mixture-of-experts language model inside its LightningModule) to
``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import KillAfter  # noqa: E402
from lightning_models import Regressor, regression_loader  # noqa: E402

from lightning_compress import Compressor  # noqa: E402

STEPS = {"regressor": 12, "mixtral": 8}


def training(model: str) -> tuple[LightningModule, DataLoader, nn.Module]:
    """The LightningModule, its data and the model whose state the test compares.

    One batch per epoch: a resumed epoch replays exactly the data an uninterrupted run sees
    (resuming inside an epoch would need a stateful data loader).
    """
    if model == "regressor":
        regressor = Regressor(optimizer="adam")
        return regressor, regression_loader(batch_size=32), regressor
    from moe_models import tiny_moe, tokens

    from lightning_compress.lightning.language_model import CausalLMModule

    torch.set_num_threads(1)
    module = CausalLMModule(tiny_moe("mixtral").train(), lr=1e-2)
    return module, DataLoader([tokens(4, 16)], batch_size=None), module.model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("out_dir")
    parser.add_argument("--model", choices=sorted(STEPS), default="regressor")
    parser.add_argument("--kill-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    out = Path(args.out_dir)
    checkpoint = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True)
    callbacks = [Compressor(Path(args.recipe).read_text()), checkpoint]
    if args.kill_after:
        callbacks.append(KillAfter(args.kill_after))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=STEPS[args.model],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module, data, trained = training(args.model)
    trainer.fit(module, data, ckpt_path=str(out / "last.ckpt") if args.resume else None)
    torch.save(dict(trained.state_dict()), out / "final.pt")


if __name__ == "__main__":
    main()
