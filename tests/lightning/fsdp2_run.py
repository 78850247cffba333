"""FSDP2 (ModelParallelStrategy, 2 CPU processes): gradual pruning of sharded weights.

Run by the test as ``python fsdp2_run.py OUT_DIR``; Lightning relaunches this script for
rank 1. Each rank writes what it saw into ``OUT_DIR/report.pt`` (rank 0 merges).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parents[1]))
from lightning_models import Regressor, regression_loader  # noqa: E402

from lightning_compress import Compressor  # noqa: E402
from lightning_compress.modifiers.pruning import MagnitudePruningModifier  # noqa: E402


class ShardedRegressor(Regressor):
    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.fc1, mesh=mesh)
        fully_shard(self.fc2, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Report(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != trainer.max_steps:
            return
        weight, mask = pl_module.fc1.weight, pl_module.fc1.weight_mask
        full = weight.full_tensor().detach()
        entry = {
            "weight_is_sharded": isinstance(weight, DTensor),
            "mask_is_sharded": isinstance(mask, DTensor),
            "local_rows": weight.to_local().shape[0],
            "full_sparsity": float((full == 0).float().mean()),
            "full_weight": full,
        }
        gathered = [None, None]
        torch.distributed.all_gather_object(gathered, entry)
        if trainer.global_rank == 0:
            torch.save(dict(enumerate(gathered)), self.out / "report.pt")


def main() -> None:
    out = Path(sys.argv[1])
    modifier = MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=0.5, start=0, end=0.375, update=0.125
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=5,
        callbacks=[Compressor(modifier), Report(out)],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(ShardedRegressor(), regression_loader(64))


if __name__ == "__main__":
    main()
