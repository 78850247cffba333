"""Calibration data from local files: text, JSON, Parquet, Arrow; paths, names, chat."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from loguru import logger

from lightning_compress.bundled import ByteTokenizer
from lightning_compress.pipelines.calibration_data import calibration_samples

LENGTH = 16
TEXTS = [
    "It is a truth universally acknowledged",
    "that a single man in possession of a good fortune",
    "must be in want of a wife.",
    "However little known the feelings or views of such a man may be",
]
TOKENIZER = ByteTokenizer()


def ids(text: str) -> torch.Tensor:
    return torch.tensor(TOKENIZER(text)["input_ids"])


def windows(tokens: torch.Tensor) -> list[torch.Tensor]:
    return list(tokens[: len(tokens) // LENGTH * LENGTH].split(LENGTH))


def samples(dataset: object, **kwargs: object) -> list[torch.Tensor]:
    found = calibration_samples(dataset, None, LENGTH, TOKENIZER, **kwargs)
    assert all(list(sample) == ["input_ids"] for sample in found)
    return [sample["input_ids"] for sample in found]


def same(found: list[torch.Tensor], expected: list[torch.Tensor]) -> bool:
    return len(found) == len(expected) and all(map(torch.equal, found, expected))


# ------------------------------------------------------------- file writers
def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(record) for record in records) + "\n")
    return path


def write_json_list(path: Path, records: list[dict]) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_parquet(path: Path, records: list[dict]) -> Path:
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet.write_table(pytest.importorskip("pyarrow").Table.from_pylist(records), path)
    return path


def write_arrow_file(path: Path, records: list[dict]) -> Path:
    pyarrow = pytest.importorskip("pyarrow")
    table = pyarrow.Table.from_pylist(records)
    with pyarrow.ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    return path


def write_saved_dataset(path: Path, records: list[dict]) -> Path:
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(records).save_to_disk(str(path), num_proc=None)
    return path


def arrow_stream_of_saved_dataset(path: Path, records: list[dict]) -> Path:
    directory = write_saved_dataset(path.with_suffix(""), records)
    (arrow,) = directory.glob("*.arrow")
    return arrow


WRITERS: dict[str, tuple[str, Callable[[Path, list[dict]], Path]]] = {
    "jsonl": (".jsonl", write_jsonl),
    "json-list": (".json", write_json_list),
    "json-lines-in-json": (".json", write_jsonl),
    "parquet": (".parquet", write_parquet),
    "arrow-file": (".arrow", write_arrow_file),
    "arrow-stream": (".arrow", arrow_stream_of_saved_dataset),
    "saved-dataset": ("", write_saved_dataset),
}


def write(kind: str, tmp_path: Path, records: list[dict]) -> Path:
    suffix, writer = WRITERS[kind]
    return writer(tmp_path / f"calibration{suffix}", records)


# ------------------------------------------------------------------- tests
def test_a_text_file_is_cut_into_windows_of_its_tokens(tmp_path):
    text = "\n".join(TEXTS)
    (tmp_path / "notes.txt").write_text(text)
    found = samples(str(tmp_path / "notes.txt"))
    assert same(found, windows(ids(text)))
    assert same(samples(tmp_path / "notes.txt"), found)  # a Path reads the same


def test_a_text_file_without_concatenation_gives_one_sample_per_non_blank_line(tmp_path):
    (tmp_path / "notes.txt").write_text("\n\n".join(TEXTS) + "\n   \n")
    found = samples(tmp_path / "notes.txt", concatenate_data=False)
    assert same(found, [ids(text)[:LENGTH] for text in TEXTS])


@pytest.mark.parametrize("kind", list(WRITERS))
def test_record_files_give_one_truncated_sample_per_record(kind, tmp_path):
    path = write(kind, tmp_path, [{"id": index, "text": text} for index, text in enumerate(TEXTS)])
    assert same(samples(str(path)), [ids(text)[:LENGTH] for text in TEXTS])


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_concatenated_records_are_cut_into_windows_of_their_joined_tokens(kind, tmp_path):
    path = write(kind, tmp_path, [{"text": text} for text in TEXTS])
    expected = windows(torch.cat([ids(text) for text in TEXTS]))
    assert len(expected) > len(TEXTS)  # the windows cross record boundaries
    assert same(samples(path, concatenate_data=True), expected)


def test_text_column_names_the_column_that_holds_the_text(tmp_path):
    records = [{"text": "not this", "content": text} for text in TEXTS]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    assert same(samples(path, text_column="content"), [ids(text)[:LENGTH] for text in TEXTS])


def test_pretokenized_records_in_a_file_are_read_as_token_ids(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert same(samples(path), [torch.tensor([5, 6, 7]), torch.tensor([8])])


@pytest.mark.parametrize("kind", ["jsonl", "json-list", "parquet"])
def test_a_missing_column_error_names_the_file_the_record_and_the_columns_found(kind, tmp_path):
    path = write(kind, tmp_path, [{"prompt": text, "id": 1} for text in TEXTS])
    where = {"jsonl": "line 1", "json-list": "record 0", "parquet": "row 0"}[kind]
    message = rf"{path} {where} has keys \['id', 'prompt'\]; expected .*'body'"
    with pytest.raises(TypeError, match=message):
        samples(path, text_column="body")


@pytest.mark.parametrize(
    "dataset", ["calibration.jsonl", "data/calibration", "my data/notes.txt", "c.PARQUET"]
)
def test_a_path_like_string_that_does_not_exist_is_refused_naming_it(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no file or directory '{dataset}'"):
        samples(dataset)
    with pytest.raises(FileNotFoundError, match="no file or directory"):
        samples(tmp_path / "missing.jsonl")


@pytest.mark.parametrize("name", ["open_platypus", "wikitext"])
def test_a_dataset_name_is_refused_as_not_downloadable_not_tokenized(name):
    with pytest.raises(ValueError, match=f"'{name}' is not a local file.*not downloaded.*to_json"):
        samples(name)


def test_a_hub_id_that_is_no_local_path_is_refused_saying_how_to_pass_a_file():
    with pytest.raises(FileNotFoundError, match="Hub dataset: hub datasets are not downloaded"):
        samples("HuggingFaceH4/ultrachat_200k")


def test_text_with_spaces_or_lines_stays_calibration_text():
    text = "see notes/a.txt and /etc for more:\n" + TEXTS[1] + " data.jsonl"
    assert same(samples(text), windows(ids(text)))


def test_an_unknown_suffix_is_refused_listing_the_accepted_ones(tmp_path):
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"suffix '.csv'; expected one of .txt, .json, .jsonl"):
        samples(tmp_path / "data.csv")


def test_an_invalid_json_line_is_refused_naming_the_line(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "fine"}\n\n{"text": "cut\n')
    with pytest.raises(ValueError, match=r"data.jsonl line 3 is not valid JSON"):
        samples(tmp_path / "data.jsonl")


def test_concatenate_data_is_refused_for_data_that_is_no_file():
    with pytest.raises(ValueError, match="concatenate_data: applies to data files only"):
        samples([{"text": TEXTS[0]}], concatenate_data=True)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"text_column": ""}, "text_column: expected a column name"),
        ({"concatenate_data": "yes"}, "concatenate_data: expected True, False or None"),
    ],
)
def test_bad_file_reading_settings_are_refused_naming_them(setting, message, tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"text": TEXTS[0]}])
    with pytest.raises(ValueError, match=message):
        samples(path, **setting)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(sink)


def test_records_with_empty_text_are_skipped_with_one_warning(tmp_path, warnings):
    records = [{"text": TEXTS[0]}, {"text": ""}, {"text": "  "}, {"text": TEXTS[1]}]
    path = write_jsonl(tmp_path / "data.jsonl", records)
    assert same(samples(path), [ids(TEXTS[0])[:LENGTH], ids(TEXTS[1])[:LENGTH]])
    assert len(warnings) == 1 and "data.jsonl line 2: empty text, skipped" in warnings[0]


def test_a_directory_of_several_splits_is_refused_naming_them(tmp_path):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_list([{"text": TEXTS[0]}])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"holds the splits \['test', 'train'\]"):
        samples(tmp_path / "dd")


# -------------------------------------------------------------------- chat
def chat_tokenizer(template: bool = True) -> object:
    """A word-level transformers tokenizer built here (nothing downloaded); it adds BOS."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    words = ["<unk>", "<s>", "user", "assistant", ":", "|", *" ".join(TEXTS).split()]
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
    )
    chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} | {% endfor %}"
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        unk_token="<unk>",
        chat_template=chat_template if template else None,
    )


CHATS = [
    [{"role": "user", "content": TEXTS[0]}, {"role": "assistant", "content": TEXTS[1]}],
    [{"role": "user", "content": TEXTS[2]}],
]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_chat_records_are_rendered_by_the_tokenizers_chat_template(kind, tmp_path):
    tokenizer = chat_tokenizer()
    path = write(kind, tmp_path, [{"messages": chat} for chat in CHATS])
    found = calibration_samples(path, None, 64, tokenizer)
    for sample, chat in zip(found, CHATS, strict=True):
        words = " ".join(f"{m['role']} : {m['content']} |" for m in chat).split()
        expected = [tokenizer.bos_token_id, *tokenizer.convert_tokens_to_ids(words)]
        assert sample["input_ids"].tolist() == expected  # one BOS: the template's


def test_chat_records_without_a_chat_template_are_refused_naming_the_record(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": chat} for chat in CHATS])
    for tokenizer in (TOKENIZER, chat_tokenizer(template=False)):
        with pytest.raises(ValueError, match=r"chat.jsonl line 1, 'messages': .* has none"):
            calibration_samples(path, None, LENGTH, tokenizer)


def test_malformed_chat_messages_are_refused_naming_the_record(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user"}]}])
    with pytest.raises(TypeError, match=r"chat.jsonl line 1, 'messages': expected a non-empty"):
        calibration_samples(path, None, LENGTH, chat_tokenizer())
