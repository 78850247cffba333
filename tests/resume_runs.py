"""Train a small model with a recipe, saving a checkpoint after every step; optionally die
(SIGKILL) after a step, or resume.

The kill-and-resume tests call :func:`train` in their own process for the uninterrupted and the
resumed runs, and :func:`killed_run` for the run that is killed: it trains in a process forked
from the test's, which SIGKILLs itself. Every run writes the final state of the trained model
(the regressor, or the mixture-of-experts language model inside its LightningModule) to
``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import torch
from helpers import KillAfter
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_models import Regressor, regression_loader
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import Compressor

STEPS = {"regressor": 12, "mixtral": 8}


def _training(model: str) -> tuple[LightningModule, DataLoader, nn.Module]:
    """The LightningModule, its data and the model whose state the test compares.

    One batch per epoch: a resumed epoch replays exactly the data an uninterrupted run sees
    (resuming inside an epoch would need a stateful data loader).
    """
    if model == "regressor":
        regressor = Regressor(optimizer="adam")
        return regressor, regression_loader(batch_size=32), regressor
    from moe_models import tiny_moe, tokens

    from lightning_compress.lightning.language_model import CausalLMModule

    module = CausalLMModule(tiny_moe("mixtral").train(), lr=1e-2)
    return module, DataLoader([tokens(4, 16)], batch_size=None), module.model


def train(
    recipe: str,
    out: Path,
    model: str = "regressor",
    kill_after: int | None = None,
    resume: bool = False,
    max_steps: int | None = None,
) -> dict[str, torch.Tensor]:
    """Trains ``model`` under a ``Compressor`` of ``recipe``, checkpointing every step to ``out``.

    The run computes on one thread, so that a run in another process (the killed one) takes
    bit for bit the same steps; the caller's thread count is restored afterwards.

    Args:
        recipe: the recipe's YAML text.
        out: the checkpoint directory (``last.ckpt`` after every step, ``final.pt`` at the end).
        model: a key of :data:`STEPS`.
        kill_after: SIGKILL the process once this many steps are saved.
        resume: continue from ``out/last.ckpt``.
        max_steps: stop after this many steps instead of ``STEPS[model]``.

    Returns:
        The trained model's final state, also saved to ``out/final.pt``.
    """
    checkpoint = ModelCheckpoint(dirpath=out, every_n_train_steps=1, save_last=True)
    callbacks = [Compressor(recipe), checkpoint]
    if kill_after:
        callbacks.append(KillAfter(kill_after))
    trainer = Trainer(
        accelerator="cpu",
        max_steps=max_steps or STEPS[model],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, data, trained = _training(model)
        trainer.fit(module, data, ckpt_path=str(out / "last.ckpt") if resume else None)
    finally:
        torch.set_num_threads(threads)
    state = dict(trained.state_dict())
    torch.save(state, out / "final.pt")
    return state


def killed_run(recipe: str, out: Path, kill_after: int, model: str = "regressor") -> int | None:
    """Runs :func:`train` in a forked process that SIGKILLs itself after ``kill_after`` steps.

    The process shares nothing with the caller after the fork: what the resumed run finds is
    what the killed one wrote to ``out``.

    Args:
        recipe: the recipe's YAML text.
        out: the checkpoint directory.
        kill_after: the number of saved steps after which the process dies.
        model: a key of :data:`STEPS`.

    Returns:
        The process's exit code: -9 where it was killed as planned (its traceback, if it failed,
        is on stderr); None where it was still running after 300 s (it is killed then).
    """
    process = multiprocessing.get_context("fork").Process(
        target=train, args=(recipe, out), kwargs={"model": model, "kill_after": kill_after}
    )
    process.start()
    process.join(300)
    exit_code = process.exitcode
    if exit_code is None:
        process.kill()
        process.join()
    return exit_code
