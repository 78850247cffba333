"""TextDataModule: packing, padding, the train/validation split and its determinism."""

from __future__ import annotations

import pytest
import torch

from lightning_compress.lightning.text_data import TextDataModule, pack_tokens, pad_tokens


class WordTokenizer:
    """Token id = word length; 0 separates documents, 99 pads."""

    eos_token_id = 0
    pad_token_id = 99

    def encode(self, text: str) -> list[int]:
        return [len(word) for word in text.split()]


def ids(samples: list[dict[str, torch.Tensor]], key: str = "input_ids") -> list[list[int]]:
    return [sample[key].tolist() for sample in samples]


def test_packing_joins_documents_with_eos_and_drops_the_incomplete_tail():
    samples = pack_tokens([[1, 2, 3], [4, 5], [6]], seq_len=3, eos=0)
    assert ids(samples) == [[1, 2, 3], [0, 4, 5], [0, 6, 0]]
    assert ids(samples, "attention_mask") == [[1, 1, 1]] * 3
    assert ids(pack_tokens([[1, 2, 3], [4, 5]], seq_len=2, eos=None)) == [[1, 2], [3, 4]]


def test_padding_truncates_pads_masks_and_leaves_out_documents_with_nothing_to_predict():
    samples = pad_tokens([[1, 2, 3, 4, 5], [6, 7], [8]], seq_len=4, pad=99)
    assert ids(samples) == [[1, 2, 3, 4], [6, 7, 99, 99]]
    assert ids(samples, "attention_mask") == [[1, 1, 1, 1], [1, 1, 0, 0]]


def test_texts_are_tokenized_packed_and_split_with_validation_last(tmp_path):
    data = TextDataModule(WordTokenizer(), seq_len=2, batch_size=2, texts=["a bb ccc", "dddd"])
    data.setup("fit")  # stream 1 2 3 0 4 0 -> windows [1,2] [3,0] [4,0]
    assert ids(data.train_data) == [[1, 2], [3, 0]]
    assert ids(data.val_data) == [[4, 0]]
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("a bb ccc", encoding="utf-8")
    second.write_text("dddd", encoding="utf-8")
    files = TextDataModule(WordTokenizer(), seq_len=2, files=[first, second])
    files.setup("fit")
    assert ids(files.train_data) + ids(files.val_data) == [[1, 2], [3, 0], [4, 0]]


def test_padded_text_batches_carry_input_ids_and_attention_mask():
    texts = ["a bb", "ccc dddd e", "ff gg", "h ii jjj"]
    data = TextDataModule(WordTokenizer(), seq_len=3, batch_size=4, texts=texts, pack=False)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    assert batch["input_ids"].tolist() == [[1, 2, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1]]
    assert sorted(ids(data.train_data)) == [[1, 2, 99], [2, 2, 99], [3, 4, 1]]


def test_training_batches_are_shuffled_the_same_way_every_time():
    tokens = torch.arange(200).view(20, 10)

    def order(seed: int) -> list[list[int]]:
        data = TextDataModule(tokens=tokens, seq_len=10, batch_size=3, seed=seed)
        data.setup("fit")
        return [batch["input_ids"][:, 0].tolist() for batch in data.train_dataloader()]

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(sum(order(0), [])) == list(range(0, 180, 10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of files, texts or tokens, got none"),
        ({"texts": ["a"], "tokens": [[1]]}, r"got \['texts', 'tokens'\]"),
        ({"texts": ["a"]}, "tokenizer: needed to tokenize texts"),
        ({"tokens": [[1, 2]], "seq_len": 1}, "seq_len: expected an integer >= 2"),
        ({"tokens": [[1, 2]], "batch_size": 0}, "batch_size: expected an integer >= 1"),
        ({"tokens": [[1, 2]], "val_fraction": 1.0}, r"val_fraction: expected a number in \[0, 1\)"),
    ],
)
def test_bad_arguments_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextDataModule(**kwargs)


def test_data_too_short_for_two_samples_is_refused_naming_seq_len():
    data = TextDataModule(tokens=[[1, 2, 3]], seq_len=3)
    with pytest.raises(ValueError, match="1 sample.*seq_len=3"):
        data.setup("fit")


def test_a_tokenizer_named_by_its_directory_is_loaded_with_auto_tokenizer(tmp_path):
    from lightning_compress.bundled.tokenizer import byte_tokenizer_fast

    byte_tokenizer_fast().save_pretrained(tmp_path)
    data = TextDataModule(str(tmp_path), seq_len=4, texts=["abcdefgh", "ijklmnop"], pack=False)
    data.setup("fit")
    assert ids(data.train_data) == [list(b"abcd")]
    assert ids(data.val_data) == [list(b"ijkl")]
