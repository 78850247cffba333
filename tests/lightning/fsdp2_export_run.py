"""GPTQ one-shot, then QAT, then a compressed-tensors checkpoint: one process or FSDP2.

Run by the test as ``python fsdp2_export_run.py single|fsdp2 OUT_DIR``; for ``fsdp2``
(``ModelParallelStrategy``, 2 CPU processes) Lightning relaunches this script for rank 1.
The Compressor saves the checkpoint to ``OUT_DIR/checkpoint``; rank 0 writes the optimizer
step at which the one-shot stage ran and whether the trained weights were sharded to
``OUT_DIR/report.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fsdp2_qat_run import GLOBAL_BATCH, train
from lightning.pytorch import Callback
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parents[1]))
from export_models import GROUP_SIZE, tiny_model, token_ids  # noqa: E402

from lightning_compress import Compressor  # noqa: E402
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier  # noqa: E402

STEPS = 1  # the export after training is what is compared (several steps: fsdp2_qat_run)
W4_GROUPS = {"num_bits": 4, "strategy": "group", "group_size": GROUP_SIZE}


class RecordingCompressor(Compressor):
    """Records the optimizer step at which the one-shot stage runs."""

    one_shot_steps: list[int]

    def _run_one_shot_stage(self, trainer, pl_module) -> None:
        self.one_shot_steps = [*getattr(self, "one_shot_steps", []), trainer.global_step]
        super()._run_one_shot_stage(trainer, pl_module)


class Report(Callback):
    """Rank 0 writes the one-shot steps and whether the trained weights were sharded."""

    def __init__(self, out: Path, compressor: RecordingCompressor) -> None:
        self.out, self.compressor = out, compressor

    def on_train_end(self, trainer, pl_module) -> None:
        sharded = any(isinstance(p, DTensor) for p in pl_module.parameters())
        if trainer.global_rank == 0:
            report = {"one_shot_steps": self.compressor.one_shot_steps, "sharded": sharded}
            torch.save(report, self.out / "report.pt")


def recipe() -> list:
    """GPTQ W4 g32 on every Linear but lm_head, then QAT on its grid from step 0."""
    groups = {"group_0": {"targets": ["Linear"], "weights": W4_GROUPS}}
    return [
        GPTQModifier(config_groups=groups, ignore=["lm_head"], actorder="none"),
        QuantizationModifier(config_groups=groups, ignore=["lm_head"], start=0),
    ]


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    model = tiny_model().train()
    # Every rank calibrates on the same batches: GPTQ's Hessians are then the one process's
    # exactly. (Each rank reading its own share gives the same sums in another order, whose
    # rounding can make GPTQ pick the neighbouring code, and later layers follow.)
    calibration = list(token_ids(4, 16, seed=3).split(GLOBAL_BATCH // 2))
    compressor = RecordingCompressor(
        recipe(), calibration_data=calibration, save_dir=out / "checkpoint"
    )
    train(mode, model, [compressor, Report(out, compressor)], STEPS)


if __name__ == "__main__":
    main()
