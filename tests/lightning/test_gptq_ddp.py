"""Two CPU processes (ddp_spawn, gloo): GPTQ and static-activation RTN equal one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

W4_G32 = {"num_bits": 4, "strategy": "group", "group_size": 32}
INT8_STATIC_ASYMMETRIC = {"num_bits": 8, "symmetric": False}
FP8 = {"type": "float", "num_bits": 8}


def recipe() -> list:
    """GPTQ on q/k/v and gate/up (shared Hessians); RTN with static FP8 and int8 inputs."""
    gptq = GPTQModifier(
        config_groups={"w4": {"targets": [r"re:.*(q|k|v|gate|up)_proj$"], "weights": W4_G32}},
        actorder="group",
    )
    rtn = QuantizationModifier(
        config_groups={
            "fp8": {"targets": [r"re:.*o_proj$"], "weights": FP8, "input_activations": FP8},
            "int8": {
                "targets": [r"re:.*down_proj$"],
                "weights": {"num_bits": 8, "strategy": "channel"},
                "input_activations": INT8_STATIC_ASYMMETRIC,
            },
        }
    )
    return [gptq, rtn]


class SaveWeights(Callback):
    """Every rank saves the calibrated model's state when validation ends."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}
        torch.save(state, self.directory / f"rank{trainer.global_rank}.pt")


def calibrate(directory: Path, **trainer_kwargs: Any) -> None:
    torch.manual_seed(0)
    config = TinyDecoderConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=64
    )
    module = CalibrationModule(TinyDecoder(config).eval(), recipe())
    data = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    trainer = Trainer(
        accelerator="cpu",
        inference_mode=False,
        callbacks=[SaveWeights(directory)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        **trainer_kwargs,
    )
    trainer.validate(module, dataloaders=DataLoader(data, batch_size=1), verbose=False)


def test_two_ranks_quantize_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate(single, devices=1)  # on one thread, as each DDP worker (tests/conftest.py)
    calibrate(ddp, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    layer = "model.layers.1.{}.weight_g_idx"
    assert {layer.format("self_attn.q_proj"), layer.format("mlp.up_proj")} <= set(expected)
    assert {"model.layers.1.self_attn.o_proj.input_scale"} <= set(expected)
    assert expected["model.layers.1.mlp.down_proj.input_zero_point"].item() != 0
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            # float8 zero points compare as float32
            assert torch.allclose(tensor.float(), expected[name].float(), rtol=0, atol=1e-6), name
