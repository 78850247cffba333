"""Damaged and badly formed calibration data files are read or refused naming the file and the
record, and ``oneshot`` refuses them before any layer of the model changes."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from export_models import VOCAB, tiny_model
from helpers import int8_channel_groups

from lightning_compress.bundled import ByteTokenizer
from lightning_compress.lightning.oneshot import calibration_samples, oneshot
from lightning_compress.modifiers import GPTQModifier

SEED = 0
CASES = 12  # damaged copies per format
LENGTH = 16
TEXTS = [f"record {index}: the quick brown fox jumps over the lazy dog" for index in range(6)]
QUIET = {"enable_progress_bar": False, "logger": False}


def write_text(path: Path, records: list[dict]) -> None:
    path.write_text("\n".join(record["text"] for record in records))


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("\n".join(json.dumps(record) for record in records))


def write_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records))


def write_parquet(path: Path, records: list[dict]) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    pytest.importorskip("pyarrow.parquet").write_table(pyarrow.Table.from_pylist(records), path)


def write_arrow(path: Path, records: list[dict]) -> None:
    pyarrow = pytest.importorskip("pyarrow")
    table = pyarrow.Table.from_pylist(records)
    with pyarrow.ipc.new_stream(str(path), table.schema) as writer:  # as save_to_disk writes
        writer.write_table(table)


FORMATS: dict[str, tuple[str, Callable[[Path, list[dict]], None]]] = {
    "txt": (".txt", write_text),
    "jsonl": (".jsonl", write_jsonl),
    "json": (".json", write_json),
    "parquet": (".parquet", write_parquet),
    "arrow": (".arrow", write_arrow),
}


def write(kind: str, directory: Path, records: list[dict]) -> Path:
    suffix, writer = FORMATS[kind]
    path = directory / f"data{suffix}"
    writer(path, records)
    return path


def damage(data: bytes, rng: random.Random) -> bytes:
    """``data`` cut short, overwritten in places, or with bytes that are not UTF-8."""
    kind = rng.choice(["truncate", "overwrite", "invalid utf-8"])
    at = rng.randrange(1, len(data))
    if kind == "truncate":
        return data[:at]
    if kind == "overwrite":
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        return bytes(damaged)
    return data[:at] + b"\xff\xfe" + data[at:]


def read(path: Path, tokenizer: Any = None, **kwargs: Any) -> list[dict[str, torch.Tensor]]:
    return calibration_samples(path, None, LENGTH, tokenizer or ByteTokenizer(), **kwargs)


@pytest.mark.parametrize("kind", list(FORMATS))
def test_damaged_files_are_read_whole_or_refused_naming_the_file(kind, tmp_path):
    rng = random.Random(f"{SEED}-{kind}")
    original = write(kind, tmp_path, [{"text": text} for text in TEXTS]).read_bytes()
    path = tmp_path / f"damaged{FORMATS[kind][0]}"
    refused = 0
    for _ in range(CASES):
        path.write_bytes(damage(original, rng))
        try:
            samples = read(path)
        except (ValueError, TypeError) as error:
            refused += 1
            assert str(path) in str(error) or "shorter than asked" in str(error), error
            continue
        for sample in samples:  # read: every sample holds byte-token ids of at most LENGTH
            ids = sample["input_ids"]
            assert ids.dtype == torch.long and 0 < len(ids) <= LENGTH
            assert int(ids.min()) >= 0 and int(ids.max()) < 256
    if kind != "txt":  # damaged structured files are mostly refused, not misread
        assert refused > 0


def test_an_empty_file_of_any_format_is_refused_naming_it(tmp_path):
    for suffix in (".txt", ".jsonl", ".json"):
        path = tmp_path / f"empty{suffix}"
        path.write_text("\n \n" if suffix != ".json" else "[]")
        with pytest.raises(ValueError, match=f"{path} holds no records"):
            read(path)


BAD_RECORDS = {
    "number text": ({"text": 3}, TypeError, r"line 1, 'text' is a int; expected a string"),
    "null text": ({"text": None}, TypeError, r"line 1, 'text' is a NoneType"),
    "list of ints text": ({"text": [1, 2]}, TypeError, r"line 1, 'text' is a list"),
    "no text column": ({"body": "x"}, TypeError, r"line 1 has keys \['body'\]; expected"),
    "chat without a chat template": (
        {"messages": [{"content": "hi"}]},
        ValueError,
        r"line 1, 'messages': chat records are rendered by the tokenizer's chat template",
    ),
    "negative ids": ({"input_ids": [3, -1]}, ValueError, r"line 1: token id -1 is negative"),
    "float ids": ({"input_ids": [0.5, 1.5]}, TypeError, r"line 1: token ids must be a non-empty"),
    "empty ids": ({"input_ids": []}, TypeError, r"line 1: token ids must be a non-empty"),
    "mask of twos": (
        {"input_ids": [1, 2], "attention_mask": [2, 1]},
        ValueError,
        r"line 1: attention_mask holds 2",
    ),
    "array record": ([1, 2, 3], TypeError, r"line 1 is a JSON list; expected an object"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_of_every_form_is_refused_naming_the_file_and_line(case, tmp_path):
    record, error, message = BAD_RECORDS[case]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"text": TEXTS[0]}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(error, match=f"{path} {message.replace('line 1', 'line 2')}"):
        read(path)


@pytest.mark.parametrize("concatenate_data", [False, True])
def test_padding_in_joined_records_is_refused_but_kept_one_record_per_sample(
    concatenate_data, tmp_path
):
    path = tmp_path / "ids.jsonl"
    write_jsonl(path, [{"input_ids": [5] * LENGTH, "attention_mask": [1] * 14 + [0, 0]}])
    if not concatenate_data:
        assert read(path, concatenate_data=False)[0]["attention_mask"].tolist()[-2:] == [0, 0]
        return
    with pytest.raises(ValueError, match=r"ids.jsonl line 1: attention_mask masks tokens out"):
        read(path, concatenate_data=True)


def test_ids_outside_the_models_vocabulary_in_a_file_are_refused_naming_the_line(tmp_path):
    path = tmp_path / "ids.jsonl"
    write_jsonl(path, [{"input_ids": [1, 2]}, {"input_ids": [1, VOCAB]}])
    with pytest.raises(ValueError, match=rf"ids.jsonl line 2: token id {VOCAB} is outside"):
        calibration_samples(path, None, LENGTH, model=tiny_model())


@pytest.mark.parametrize("fault_line", [1, 3, 5])
def test_oneshot_on_a_damaged_file_leaves_the_model_unchanged(fault_line, tmp_path):
    rng = random.Random(f"{SEED}-{fault_line}")
    lines = [json.dumps({"input_ids": [rng.randrange(VOCAB) for _ in range(8)]}) for _ in range(6)]
    lines[fault_line - 1] = lines[fault_line - 1][: rng.randrange(2, 10)]  # cut mid-record
    path = tmp_path / "calibration.jsonl"
    path.write_text("\n".join(lines))
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    gptq = GPTQModifier(config_groups=int8_channel_groups(["Linear"]), ignore=["lm_head"])
    with pytest.raises(ValueError, match=f"calibration.jsonl line {fault_line} is not valid JSON"):
        oneshot(model, gptq, dataset=path, num_calibration_samples=None, trainer_kwargs=QUIET)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], t) for name, t in before.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
