"""Compression metrics reach the Trainer's own loggers at the configured cadence."""

from __future__ import annotations

import csv

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning_models import Regressor, regression_loader

from lightning_compress import Compressor
from lightning_compress.modifiers import MagnitudePruningModifier


def test_sparsity_and_schedule_targets_are_logged(tmp_path):
    modifier = MagnitudePruningModifier(
        targets=["fc1", "fc2"], final_sparsity=0.5, start=0, end=1, update=0.25
    )
    logger = CSVLogger(tmp_path, name="run")
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        callbacks=[Compressor(modifier, model_log_cadence=0.5)],
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(Regressor(), regression_loader())
    with open(logger.log_dir + "/metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    assert {
        "compression/ParamPruning/fc1",
        "compression/ParamPruning/__all__",
        "compression/MagnitudePruningModifier/target_sparsity",
        "compression/MagnitudePruningModifier/sparsity/fc1",
    } <= columns
    model_logs = [row for row in rows if row["compression/ParamPruning/__all__"]]
    assert len(model_logs) == 4  # every half epoch over 2 epochs of 8 steps
    targets = [
        float(row["compression/MagnitudePruningModifier/target_sparsity"])
        for row in rows
        if row["compression/MagnitudePruningModifier/target_sparsity"]
    ]
    assert targets == sorted(targets) and targets[-1] == 0.5
