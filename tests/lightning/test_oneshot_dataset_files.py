"""oneshot(dataset=PATH): a decoder calibrated from a JSON Lines file written here, read with the
bundled tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from lightning_compress.bundled import (
    TinyDecoder,
    TinyDecoderConfig,
    bundled_text,
    load_tokenizer,
)
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier

QUIET = {"enable_progress_bar": False, "logger": False}
LENGTH, SAMPLES = 64, 4


def gptq() -> GPTQModifier:
    return GPTQModifier(scheme="W4A16", ignore=["lm_head"])


def decoder() -> TinyDecoder:
    """A seeded two-block decoder over the bundled tokenizer's 256 byte ids, wide enough for
    W4A16's groups of 128."""
    torch.manual_seed(0)
    config = TinyDecoderConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4
    )
    return TinyDecoder(config)


def test_oneshot_calibrates_on_a_jsonl_file_as_on_its_records_tokenized(tmp_path):
    tokenizer = load_tokenizer()
    paragraphs = [p for p in bundled_text("calibration").split("\n\n") if len(p) > LENGTH]
    texts = paragraphs[:SAMPLES]
    path = tmp_path / "calibration.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(texts)))

    from_file = oneshot(
        decoder(),
        gptq(),
        dataset=str(path),
        tokenizer=tokenizer,
        text_column="body",
        num_calibration_samples=SAMPLES,
        max_seq_length=LENGTH,
        trainer_kwargs=QUIET,
    )
    records = [{"input_ids": tokenizer(text)["input_ids"][:LENGTH]} for text in texts]
    from_ids = oneshot(
        decoder(),
        gptq(),
        dataset=records,
        num_calibration_samples=SAMPLES,
        max_seq_length=LENGTH,
        trainer_kwargs=QUIET,
    )
    compressed = from_file.state_dict()
    assert any(name.endswith("weight_scale") for name in compressed)
    assert compressed.keys() == from_ids.state_dict().keys()
    for name, tensor in from_ids.state_dict().items():
        torch.testing.assert_close(compressed[name], tensor, msg=name)


def test_oneshot_refuses_a_missing_dataset_file_before_changing_the_model(tmp_path):
    model = decoder()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(FileNotFoundError, match="no file or directory 'calib.jsonl'"):
        oneshot(model, gptq(), dataset="calib.jsonl", tokenizer=load_tokenizer())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], t) for name, t in before.items())
