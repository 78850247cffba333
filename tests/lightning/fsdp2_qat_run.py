"""QAT with kept 2:4 zeros on a tiny Hugging Face Llama: one process, DDP or FSDP2.

:func:`run` trains in the calling process; for ``ddp`` and ``fsdp2`` (``ModelParallelStrategy``)
the test calls it in each of 2 processes (``forked_ranks.run_ranks``). Rank 0 writes the
model's full state after the last step to ``OUT_DIR/state.pt``, with whether its weights and
masks were sharded; each rank writes what the sparsity and coverage reports say at the end to
``OUT_DIR/reported_RANK.pt``. ``fsdp2_export_run.py`` trains with :func:`train` as well.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parents[1]))
from export_models import prune_2_4, tiny_model, token_ids  # noqa: E402

from lightning_compress import Compressor  # noqa: E402
from lightning_compress.core import model_sparsity  # noqa: E402
from lightning_compress.lightning.language_model import CausalLMModule  # noqa: E402
from lightning_compress.modifiers import QuantizationModifier  # noqa: E402
from lightning_compress.modifiers.pruning import ConstantPruningModifier  # noqa: E402

# Several steps agree with one process up to float rounding, because the weights are
# asymmetric. A symmetric min-max scale (absmax / 7.5 for int4, compressed-tensors' convention)
# puts the most negative weight of a group whose absmax is negative exactly on the rounding
# tie -7.5 between codes -8 and -7: the float rounding of the gradients' all-reduce (summed in
# another order than one process sums them) then picks the other code, a full grid step apart.
# Measured on this model (SGD, 2 ranks against one process): after one step 9 of 73,728 codes
# differ, all of them such ties; after four, the trained weights differ by up to 1e-2. Without
# fake quantization (masks only), or with asymmetric weights (min and max map to exact codes),
# the weights agree within 6e-8 after four steps, under DDP and FSDP2 alike.
STEPS = 4
GLOBAL_BATCH = 4


class SGDCausalLM(CausalLMModule):
    """Plain SGD (Adam's normalized steps would turn float-rounding noise in near-zero
    gradients into learning-rate-sized differences between runs); each of the ranks reads
    every other window, so their batches together are the single process's batch."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        rank, ranks = self.trainer.global_rank, self.trainer.world_size
        return DataLoader(windows()[rank::ranks], batch_size=GLOBAL_BATCH // ranks)


class ShardedCausalLM(SGDCausalLM):
    """Shards each decoder layer and then the whole model across the data-parallel ranks."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class FinalState(Callback):
    """Rank 0 saves the full model state after the last step."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != STEPS:
            return
        state = pl_module.model.state_dict()
        report = {
            "sharded": sorted(n for n, t in state.items() if isinstance(t, DTensor)),
            "state": {
                name: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()
                for name, t in state.items()
            },
        }
        if trainer.global_rank == 0:
            torch.save(report, self.out / "state.pt")

    def on_train_end(self, trainer, pl_module):
        """Each rank saves what the reports say of the trained model (after the Compressor's
        summary): its sparsity, and the layers the summary and the coverage see as pruned."""
        summary = next(item for item in trainer.callbacks if isinstance(item, Compressor)).summary
        reported = {
            "sparsity": model_sparsity(pl_module),
            "sparse": summary.sparse,
            "compressed": summary.coverage.compressed,
        }
        torch.save(reported, self.out / f"reported_{trainer.global_rank}.pt")


def windows() -> torch.Tensor:
    """The training windows, in order."""
    return token_ids(GLOBAL_BATCH * STEPS, 16, seed=2)


def recipe() -> list:
    group = {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32, "symmetric": False},
        "input_activations": {"num_bits": 8, "symmetric": False, "observer": "moving_average"},
    }
    return [
        ConstantPruningModifier(targets=["re:.*layers.*_proj$"], start=0),
        QuantizationModifier(config_groups={"group_0": group}, ignore=["lm_head"], start=0),
    ]


def train(mode: str, model: nn.Module, callbacks: list[Callback], steps: int) -> None:
    """Trains ``model`` with SGD for ``steps`` steps with ``callbacks``.

    Args:
        mode: ``single`` (one process), ``ddp`` or ``fsdp2`` (2 CPU processes; Lightning
            relaunches the calling script for rank 1 unless the ranks run already).
        model: the Hugging Face causal LM.
        callbacks: the Trainer's callbacks.
        steps: the optimizer steps.
    """
    if mode == "single":
        module, ranks = SGDCausalLM(model, lr=0.5), {"devices": 1}
    elif mode == "ddp":
        module = SGDCausalLM(model, lr=0.5)
        ranks = {"devices": 2, "strategy": "ddp", "use_distributed_sampler": False}
    else:
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
        module = ShardedCausalLM(model, lr=0.5)
        ranks = {"devices": 2, "strategy": strategy, "use_distributed_sampler": False}
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        **ranks,
    )
    trainer.fit(module)


def run(mode: str, out: Path) -> None:
    """Trains the 2:4-pruned tiny Llama with QAT for ``STEPS`` steps, reporting to ``out``.

    Args:
        mode: ``single``, ``ddp`` or ``fsdp2`` (see :func:`train`).
        out: the folder for ``state.pt`` and ``reported_RANK.pt``.
    """
    model = tiny_model().train()
    prune_2_4(model)
    train(mode, model, [Compressor(recipe()), FinalState(out)], STEPS)
