"""oneshot(): dataset forms, sizes, errors, data-free runs and the export hook point."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import int8_channel_groups
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_compress.bundled import ByteTokenizer, TinyDecoder, TinyDecoderConfig
from lightning_compress.export import ExportError
from lightning_compress.lightning.oneshot import calibration_loader, calibration_samples, oneshot
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

IDS = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(0))
RTN = QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"])
QUIET = {"enable_progress_bar": False}


def tiny_decoder() -> TinyDecoder:
    torch.manual_seed(0)
    config = TinyDecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4)
    return TinyDecoder(config).eval()


class Rows(Dataset):
    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


class HuggingFaceLike(Rows):
    """What oneshot needs of a ``datasets.Dataset``: columns, length, row access."""

    def __init__(self, column: str, rows: list[Any]) -> None:
        super().__init__([{column: row, "label": 0} for row in rows])
        self.column_names = [column, "label"]


TEXT = "It is a truth universally acknowledged, that a single man in possession"
TEXT_IDS = torch.tensor(list(TEXT.encode()))


@pytest.mark.parametrize(
    "dataset",
    [
        IDS,
        [{"input_ids": row.tolist()} for row in IDS],
        Rows([{"input_ids": row} for row in IDS]),
        Rows(list(IDS)),
        DataLoader(IDS, batch_size=3),
        DataLoader(TensorDataset(IDS), batch_size=3),
        DataLoader([{"input_ids": row} for row in IDS], batch_size=2),
        HuggingFaceLike("input_ids", [row.tolist() for row in IDS]),
    ],
    ids=["tensor", "dicts", "dataset", "tensors", "loader", "tensor-dataset", "dict-loader", "hf"],
)
def test_every_dataset_form_gives_the_same_samples(dataset):
    samples = calibration_samples(dataset, 3, max_seq_length=8)
    assert len(samples) == 3
    for sample, row in zip(samples, IDS, strict=False):
        assert list(sample) == ["input_ids"] and torch.equal(sample["input_ids"], row[:8])


@pytest.mark.parametrize(
    "dataset",
    [TEXT, [TEXT], HuggingFaceLike("text", [TEXT]), [{"text": TEXT}]],
    ids=["string", "strings", "hf-text", "text-dicts"],
)
def test_text_is_tokenized(dataset):
    samples = calibration_samples(dataset, 1, max_seq_length=16, tokenizer=ByteTokenizer())
    assert torch.equal(samples[0]["input_ids"], TEXT_IDS[:16])


def test_a_long_text_is_cut_into_windows():
    samples = calibration_samples(TEXT, None, max_seq_length=16, tokenizer=ByteTokenizer())
    assert len(samples) == len(TEXT) // 16
    assert torch.equal(torch.cat([s["input_ids"] for s in samples]), TEXT_IDS[: 16 * len(samples)])


def test_batches_are_padded_with_a_mask():
    samples = calibration_samples(
        [{"input_ids": [5, 6, 7], "attention_mask": [0, 1, 1]}, {"input_ids": [8]}], 2, 8
    )
    (batch,) = list(calibration_loader(samples, batch_size=2, pad_id=9))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    (plain,) = list(calibration_loader(calibration_samples(IDS, 2, 8), batch_size=2))
    assert list(plain) == ["input_ids"]


@pytest.mark.parametrize(
    ("dataset", "kwargs", "error", "message"),
    [
        (IDS, {"num_samples": 5}, ValueError, "calibration data shorter than asked: 4 samples"),
        ([], {"num_samples": None}, ValueError, "shorter than asked: 0 samples available"),
        (IDS, {"num_samples": 0}, ValueError, "num_calibration_samples: expected a positive"),
        (IDS, {"max_seq_length": 0}, ValueError, "max_seq_length: expected a positive int"),
        (3.5, {}, TypeError, "dataset: expected a LongTensor"),
        (IDS.float(), {}, TypeError, "dataset: a tensor must hold integer token ids"),
        (IDS[0], {}, TypeError, r"of shape \[N, L\]"),
        ([{"ids": [1]}], {}, TypeError, "has keys \\['ids'\\]; expected 'input_ids'"),
        ([TEXT], {}, TypeError, "text needs a tokenizer"),
        ([{"input_ids": []}], {}, TypeError, "non-empty 1-D sequence of integers"),
        (DataLoader([1.0, 2.0]), {}, TypeError, "a DataLoader batch is a Tensor"),
    ],
)
def test_bad_data_is_refused_clearly(dataset, kwargs, error, message):
    kwargs = {"num_samples": 1, "max_seq_length": 8, **kwargs}
    with pytest.raises(error, match=message):
        calibration_samples(dataset, **kwargs)


@pytest.mark.parametrize("pipeline", ["auto", "sequential"])
def test_oneshot_compresses_in_place_and_matches_the_data_free_run(pipeline, monkeypatch):
    data_free = oneshot(tiny_decoder(), RTN)
    model = tiny_decoder()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    compressed = oneshot(
        model,
        RTN,
        dataset=[{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5, 6]}, {"input_ids": [7]}],
        num_calibration_samples=3,
        batch_size=2,
        offload_dir=None,
        pipeline=pipeline,
        trainer_kwargs=QUIET,
    )
    assert compressed is model
    # weight-only RTN needs no activations: auto does not run the model at all
    assert len(forwards) == (0 if pipeline == "auto" else 2)
    assert model.state_dict().keys() == data_free.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, data_free.state_dict()[name]), name


def test_which_modifiers_need_calibration_data():
    assert not RTN.needs_calibration_data
    assert not QuantizationModifier(scheme="W8A8", ignore=["lm_head"]).needs_calibration_data
    static = QuantizationModifier(scheme="FP8", ignore=["lm_head"])
    assert static.needs_calibration_data
    assert GPTQModifier(scheme="W4A16").needs_calibration_data


def test_oneshot_refuses_bad_arguments_before_calibrating(tmp_path):
    model = tiny_decoder()
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        oneshot({"not": "a model"}, RTN, IDS)
    (tmp_path / "old.txt").write_text("")
    with pytest.raises(ExportError, match="exists and is not empty"):
        oneshot(model, RTN, IDS, num_calibration_samples=4, output_dir=tmp_path)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        oneshot(model, RTN, IDS, num_calibration_samples=4, batch_size=0)
    with pytest.raises(ValueError, match="starts worker processes that cannot hand"):
        oneshot(model, RTN, IDS, num_calibration_samples=4, devices=2, strategy="ddp_spawn")
    with pytest.raises(ValueError, match="pipeline='fast' is not known"):
        oneshot(model, RTN, IDS, num_calibration_samples=4, pipeline="fast", trainer_kwargs=QUIET)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
