"""``Compressor(save_dir=...)`` saves a deployable checkpoint: the model, its recipe and its
tokenizer (given, or the LightningModule's, or the datamodule's), with files readable by all."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import pytest
from export_models import tiny_model, token_ids
from loguru import logger
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from lightning_compress import Compressor
from lightning_compress.bundled import ByteTokenizer
from lightning_compress.bundled.tokenizer import byte_tokenizer_fast
from lightning_compress.export import ExportError
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.modifiers import MagnitudePruningModifier

TEXT = "Emma Woodhouse, handsome"


class TokenDataModule(pl.LightningDataModule):
    """Random token windows, with a tokenizer attribute."""

    def __init__(self, tokenizer: Any | None = None):
        super().__init__()
        self.tokenizer = tokenizer

    def train_dataloader(self) -> DataLoader:
        return DataLoader(token_ids(8, 16), batch_size=4)


class Recorder(pl.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        yield messages
    finally:
        logger.remove(sink)


def fit(compressor: Compressor, module: pl.LightningModule, datamodule=None) -> Recorder:
    recorder = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[compressor, recorder],
    )
    trainer.fit(module, datamodule=datamodule or TokenDataModule())
    return recorder


def pruning() -> MagnitudePruningModifier:
    return MagnitudePruningModifier(
        targets=["re:.*mlp.*_proj$"], final_sparsity=0.5, start=0, end=1, update=1
    )


def assert_byte_tokenizer_saved(path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer(TEXT).input_ids == list(TEXT.encode())
    assert tokenizer.decode(tokenizer(TEXT).input_ids) == TEXT


def test_the_modules_tokenizer_is_saved_and_loads_with_autotokenizer(tmp_path):
    module = CausalLMModule(tiny_model().train(), tokenizer=ByteTokenizer())
    fit(Compressor([pruning()], save_dir=tmp_path / "out"), module)
    assert_byte_tokenizer_saved(tmp_path / "out")


def test_the_bundled_module_brings_its_tokenizer():
    assert isinstance(CausalLMModule().tokenizer, ByteTokenizer)


def test_the_datamodules_tokenizer_is_saved_when_the_module_has_none(tmp_path):
    module = CausalLMModule(tiny_model().train())
    datamodule = TokenDataModule(byte_tokenizer_fast())
    fit(Compressor([pruning()], save_dir=tmp_path / "out"), module, datamodule)
    assert_byte_tokenizer_saved(tmp_path / "out")


def test_a_tokenizer_given_to_the_compressor_comes_first(tmp_path):
    module = CausalLMModule(tiny_model().train(), tokenizer=object())  # not saveable, not used
    compressor = Compressor([pruning()], save_dir=tmp_path / "out", tokenizer=ByteTokenizer())
    fit(compressor, module)
    assert_byte_tokenizer_saved(tmp_path / "out")


def test_no_tokenizer_anywhere_is_warned_at_setup_naming_the_save_dir(tmp_path):
    module = CausalLMModule(tiny_model().train())
    with warnings_logged() as warnings:
        fit(Compressor([pruning()], save_dir=tmp_path / "out"), module)
    found = [w for w in warnings if "found no tokenizer" in w]
    assert len(found) == 1 and str(tmp_path / "out") in found[0]
    assert (tmp_path / "out" / "config.json").is_file()
    assert not (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize(
    ("where", "kwargs"),
    [
        ("Compressor.tokenizer", {"compressor": "gpt2"}),
        ("CausalLMModule.tokenizer", {"module": 42}),
    ],
)
def test_a_tokenizer_that_cannot_be_saved_is_refused_before_training(where, kwargs, tmp_path):
    module = CausalLMModule(tiny_model().train(), tokenizer=kwargs.get("module"))
    compressor = Compressor(
        [pruning()], save_dir=tmp_path / "out", tokenizer=kwargs.get("compressor")
    )
    recorder = Recorder()
    with pytest.raises(TypeError, match=rf"{where}: expected a transformers tokenizer"):
        recorder = fit(compressor, module)
    assert recorder.steps == 0
    assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_existing_save_dir_which_is_refused_otherwise(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("old")
    module = CausalLMModule(tiny_model().train(), tokenizer=ByteTokenizer())
    with pytest.raises(ExportError, match="overwrite=True"):
        fit(Compressor([pruning()], save_dir=out), module)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]

    fit(Compressor([pruning()], save_dir=out, overwrite=True), module)
    assert not (out / "notes.txt").exists()
    assert_byte_tokenizer_saved(out)
    mask = os.umask(0)
    os.umask(mask)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~mask}
