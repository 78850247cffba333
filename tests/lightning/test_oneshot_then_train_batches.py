"""The one-shot stage before training reads the batch forms CausalLMModule trains on."""

from __future__ import annotations

import pytest
import torch
from helpers import quiet_trainer
from oneshot_then_train_runs import QuantizedState, gptq_then_qat, tiny_module, token_loader

from lightning_compress.lightning import Compressor
from lightning_compress.lightning.text_data import TextDataModule


def first_quantized_state(calibration_data=None, datamodule=None) -> dict[str, torch.Tensor]:
    """The one-shot (GPTQ) weights and scales at the first training batch."""
    state = QuantizedState()
    compressor = Compressor(
        gptq_then_qat(), calibration_data=calibration_data, num_calibration_batches=2
    )
    trainer = quiet_trainer(max_steps=1, callbacks=[compressor, state])
    if datamodule is None:
        trainer.fit(tiny_module(), token_loader(samples=8))
    else:
        trainer.fit(tiny_module(), datamodule=datamodule)
    return state.first


def test_mapping_batches_with_labels_calibrate_like_their_token_ids():
    batches = list(token_loader())[:2]
    mappings = [
        {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        for ids in batches
    ]
    expected = first_quantized_state(calibration_data=batches)
    state = first_quantized_state(calibration_data=mappings)
    assert state.keys() == expected.keys() and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("pack", [True, False])
def test_the_one_shot_stage_and_training_read_text_datamodule_batches(pack):
    documents = torch.randint(0, 64, (8, 20), generator=torch.Generator().manual_seed(0))
    data = TextDataModule(tokens=documents, seq_len=16, batch_size=4, pack=pack)
    state = first_quantized_state(datamodule=data)
    assert any(name.endswith("weight_scale") for name in state)


def test_a_batch_the_model_cannot_read_is_refused_naming_its_type():
    with pytest.raises(TypeError, match=r"calibration batch 0.* a str;"):
        first_quantized_state(calibration_data=["some text"])
