"""Bad calibration data of every accepted form, and unwritable output directories, are refused
with a clear error before any layer of the model changes."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from export_models import VOCAB, tiny_model
from helpers import int8_channel_groups
from lightning.pytorch import Trainer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from transformers import GPT2Config, GPT2LMHeadModel

from lightning_compress.cli import main
from lightning_compress.export import ExportError, check_output_dir
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.lightning.oneshot import calibration_loader, calibration_samples, oneshot
from lightning_compress.modifiers import GPTQModifier

QUIET = {"enable_progress_bar": False, "logger": False}
POSITIONS = 64  # the tiny Llama's max_position_embeddings
ROWS, LENGTH, BATCH = 6, 8, 2
BAD_ROW = 3  # the second row of the second DataLoader batch
SEED = 0


def gptq() -> GPTQModifier:
    return GPTQModifier(config_groups=int8_channel_groups(["Linear"]), ignore=["lm_head"])


def token_ids(rows: int = ROWS, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(1, VOCAB, (rows, length), generator=torch.Generator().manual_seed(SEED))


def padding_mask(rows: int = ROWS, length: int = LENGTH) -> torch.Tensor:
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, -2:] = 0
    return mask


class Rows(Dataset):
    """A map-style torch Dataset over a list."""

    def __init__(self, rows: list[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        return self.rows[index]


class HuggingFaceLike(Rows):
    """What calibration needs of a ``datasets.Dataset`` (not installed here): columns, rows."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__(rows)
        self.column_names = list(rows[0]) if rows else ["input_ids"]


def _dicts(
    ids: torch.Tensor, mask: torch.Tensor | None, lists: bool = True
) -> list[dict[str, Any]]:
    """One dict per row, holding lists (as tokenizers give them) or tensors."""
    rows = [{"input_ids": row.tolist() if lists else row} for row in ids]
    for row, values in zip(rows, mask if mask is not None else [], strict=False):
        row["attention_mask"] = values.tolist() if lists else values
    return rows


def _tensors(ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    return (ids,) if mask is None else (ids, mask)


# Every accepted form, built from token ids [N, L] and an optional mask (None: the form has none).
FORMS: dict[str, Callable[[torch.Tensor, torch.Tensor | None], Any]] = {
    "tensor": lambda ids, mask: ids,
    "dicts": _dicts,
    "dataset": lambda ids, mask: Rows(_dicts(ids, mask)),
    "tuple-dataset": lambda ids, mask: TensorDataset(*_tensors(ids, mask)),
    "hf": lambda ids, mask: HuggingFaceLike(_dicts(ids, mask)),
    "loader-tensors": lambda ids, mask: DataLoader(ids, batch_size=BATCH),
    "loader-dicts": lambda ids, mask: DataLoader(Rows(_dicts(ids, mask, lists=False)), BATCH),
    "loader-tuples": lambda ids, mask: DataLoader(TensorDataset(*_tensors(ids, mask)), BATCH),
}
MASKLESS = {"tensor", "loader-tensors"}


def where(form: str, row: int) -> str:
    """How the error names the sample at ``row`` of ``form``."""
    if form.startswith("loader"):
        return rf"dataset batch {row // BATCH}, row {row % BATCH}"
    return rf"dataset (row|item) {row}"


def _with(tensor: torch.Tensor, value: int) -> torch.Tensor:
    tensor = tensor.clone()
    tensor[BAD_ROW, 2] = value
    return tensor


INTEGERS = r"integer.*, got torch\."  # what both refusals of non-integer ids say
# name: (ids, mask, max_seq_length, error, message, row the message names or None)
VARIANTS: dict[str, tuple[torch.Tensor, torch.Tensor | None, int, type, str, int | None]] = {
    "float-ids": (token_ids().float(), None, LENGTH, TypeError, INTEGERS + "float32", None),
    "bool-ids": (token_ids().bool(), None, LENGTH, TypeError, INTEGERS + "bool", None),
    "negative-id": (
        _with(token_ids(), -1),
        None,
        LENGTH,
        ValueError,
        r"token id -1 is negative; expected ids >= 0",
        BAD_ROW,
    ),
    "out-of-vocabulary-id": (
        _with(token_ids(), VOCAB),
        None,
        LENGTH,
        ValueError,
        rf"token id {VOCAB} is outside the model's vocabulary; expected ids below {VOCAB}",
        BAD_ROW,
    ),
    "longer-than-positions": (
        token_ids(length=POSITIONS + 4),
        None,
        4 * POSITIONS,
        ValueError,
        rf"{POSITIONS + 4} tokens, more than the model's {POSITIONS} positions",
        0,
    ),
    "empty": (token_ids(rows=0), None, LENGTH, ValueError, r"0 samples available", None),
    "mask-value-2": (
        token_ids(),
        _with(padding_mask(), 2),
        LENGTH,
        ValueError,
        r"attention_mask holds 2; expected only 0 \(padding\) and 1 \(token\)",
        BAD_ROW,
    ),
    "mask-shape": (
        token_ids(),
        padding_mask(length=LENGTH - 1),
        LENGTH,
        ValueError,
        rf"attention_mask has shape \[{LENGTH - 1}\]; expected the shape of input_ids, "
        rf"\[{LENGTH}\]",
        0,
    ),
}
CASES = [
    pytest.param(form, variant, id=f"{form}-{variant}")
    for form in FORMS
    for variant, (_, mask, *_rest) in VARIANTS.items()
    if mask is None or form not in MASKLESS
]


@pytest.fixture
def llama() -> nn.Module:
    return tiny_model("llama", seed=SEED)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same tensors (no added buffer, no changed value) and no hook left on any module."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert torch.equal(tensor, before[name]), name
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, module
        assert not module._backward_hooks, module


@pytest.mark.parametrize(("form", "variant"), CASES)
def test_bad_data_of_every_form_is_refused_before_the_model_changes(llama, form, variant):
    ids, mask, max_seq_length, error, message, row = VARIANTS[variant]
    dataset = FORMS[form](ids, mask)
    if row is not None:
        message = f"{where(form, row)}: .*{message}"
    before = snapshot(llama)
    with pytest.raises(error, match=message):
        oneshot(
            llama,
            gptq(),
            dataset,
            num_calibration_samples=None,
            max_seq_length=max_seq_length,
            batch_size=BATCH,
            trainer_kwargs=QUIET,
        )
    assert_untouched(llama, before)


@pytest.mark.parametrize("seed", range(12))
def test_a_random_bad_value_is_reported_where_it_is(llama, seed):
    """Fault injection: a bad id or mask value at a random place of a random dataset form."""
    rng = random.Random(seed)
    ids, mask = token_ids(), padding_mask()
    target, value, message = rng.choice(
        [
            (ids, -rng.randint(1, 1000), "is negative; expected ids >= 0"),
            (ids, VOCAB + rng.randint(0, 1000), "outside the model's vocabulary; expected ids"),
            (mask, rng.choice([-1, 2, 7]), "expected only 0 (padding) and 1 (token)"),
        ]
    )
    row, column = rng.randrange(ROWS), rng.randrange(LENGTH)
    target[row, column] = value
    form = rng.choice([form for form in FORMS if target is ids or form not in MASKLESS])
    before = snapshot(llama)
    with pytest.raises(ValueError, match=rf"{where(form, row)}: .*{value}.*{re.escape(message)}"):
        oneshot(llama, gptq(), FORMS[form](ids, mask), max_seq_length=LENGTH, **_quiet())
    assert_untouched(llama, before)


@pytest.mark.parametrize(
    ("tuples", "where_"),
    [
        (TensorDataset(token_ids(), padding_mask(), token_ids()), "dataset item 0 is a tuple"),
        (DataLoader(TensorDataset(token_ids(), padding_mask(), token_ids()), 2), "batch 0 is a"),
    ],
    ids=["tuple-dataset", "loader-tuples"],
)
def test_tuples_of_more_than_ids_and_mask_are_refused(llama, tuples, where_):
    before = snapshot(llama)
    expected = r"of 3 tensors; expected \(input_ids,\) or \(input_ids, attention_mask\)"
    with pytest.raises(TypeError, match=rf"{where_} .*{expected}"):
        oneshot(llama, gptq(), tuples, num_calibration_samples=None, trainer_kwargs=QUIET)
    assert_untouched(llama, before)


def test_a_mask_with_fewer_rows_than_the_batch_is_refused():
    loader = [{"input_ids": token_ids(rows=2), "attention_mask": padding_mask(rows=1)}]
    with pytest.raises(
        ValueError, match=r"batch 0: attention_mask has shape \[1, 8\]; expected one"
    ):
        calibration_samples(DataLoader(loader, batch_size=None), None, LENGTH)


def test_a_dataloader_over_lists_of_ids_is_refused_not_transposed():
    """Default collate turns items holding lists into one tensor per position, not [B, L]."""
    loader = DataLoader(_dicts(token_ids(), None), batch_size=BATCH)
    with pytest.raises(TypeError, match=r"batch 0: input_ids is a list of 8 tensors; expected a"):
        calibration_samples(loader, None, LENGTH)


@pytest.mark.parametrize("form", [form for form in FORMS if form not in MASKLESS])
def test_the_attention_mask_of_every_form_reaches_the_model(llama, form):
    ids, mask = token_ids(), padding_mask()
    samples = calibration_samples(FORMS[form](ids, mask), None, LENGTH, model=llama)
    batches = list(calibration_loader(samples, batch_size=BATCH, shard=False))
    assert torch.equal(torch.cat([batch["attention_mask"] for batch in batches]), mask)
    assert torch.equal(torch.cat([batch["input_ids"] for batch in batches]), ids)


def test_a_dataloader_of_ids_and_mask_tuples_calibrates_with_its_mask():
    ids, mask = token_ids(), padding_mask()
    model = tiny_model("llama", seed=SEED)
    seen: list[torch.Tensor] = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["attention_mask"]), with_kwargs=True
    )
    loader = DataLoader(TensorDataset(ids, mask), batch_size=BATCH)
    oneshot(model, gptq(), loader, **_quiet())
    handle.remove()
    assert torch.equal(torch.cat(seen), mask)


def _quiet() -> dict[str, Any]:
    return {"batch_size": BATCH, "num_calibration_samples": None, "trainer_kwargs": QUIET}


def test_ids_beyond_learned_position_embeddings_are_refused():
    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"dataset row 0: 24 tokens, more than the model's 16"):
        oneshot(model, gptq(), token_ids(length=24), max_seq_length=32, **_quiet())
    with pytest.raises(ValueError, match=r"dataset row 3: token id 128 is outside"):
        oneshot(model, gptq(), _with(token_ids(), VOCAB), **_quiet())
    assert_untouched(model, before)


def test_a_bad_batch_is_refused_as_it_arrives(llama):
    """The DataLoader is read up to the first bad batch, not to its end."""
    ids = _with(token_ids(rows=8), -5)
    read: list[int] = []

    class Counting(Rows):
        def __getitem__(self, index: int) -> Any:
            read.append(index)
            return super().__getitem__(index)

    loader = DataLoader(Counting(list(ids)), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"dataset batch 1, row 1: token id -5 is negative"):
        calibration_samples(loader, None, LENGTH, model=llama)
    assert read == [0, 1, 2, 3]


# ------------------------------------------------------------- output directories
def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("a file, not a directory")
    return tmp_path / "notes.txt" / "compressed"


def _read_only_mount(tmp_path: Path) -> Path:
    # sysfs takes no new files, even from root (permission bits would not stop root).
    return Path("/sys/lightning-compress-test/compressed")


UNWRITABLE = [pytest.param(_under_a_file, id="under-a-file")]
if Path("/sys/kernel").is_dir():
    UNWRITABLE.append(pytest.param(_read_only_mount, id="read-only-mount"))


@pytest.mark.parametrize("target", UNWRITABLE)
def test_an_unwritable_output_dir_fails_before_calibrating(llama, tmp_path, target):
    output_dir = target(tmp_path)
    before = snapshot(llama)
    with pytest.raises(ExportError, match=rf"output directory '{output_dir}'"):
        oneshot(llama, gptq(), token_ids(), output_dir=output_dir, **_quiet())
    assert_untouched(llama, before)


def test_a_non_empty_output_dir_fails_before_calibrating(llama, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    before = snapshot(llama)
    with pytest.raises(ExportError, match=rf"'{tmp_path}' exists and is not empty"):
        oneshot(llama, gptq(), token_ids(), output_dir=tmp_path, **_quiet())
    assert_untouched(llama, before)


def test_the_write_check_leaves_nothing_behind(tmp_path):
    assert check_output_dir(tmp_path / "a" / "b", overwrite=False) == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


def test_the_compress_command_fails_before_calibrating_on_an_unwritable_output_dir(
    tmp_path, monkeypatch
):
    calibrations: list[int] = []
    prepare = CalibrationModule._prepare
    monkeypatch.setattr(
        CalibrationModule,
        "_prepare",
        lambda self, *args, **kwargs: calibrations.append(1) or prepare(self, *args, **kwargs),
    )
    config = {
        "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False},
        "model": {
            "class_path": "lightning_compress.lightning.language_model.CausalLMModule",
            "init_args": {
                "model": {
                    "class_path": "lightning_compress.bundled.TinyDecoder",
                    "init_args": {"config": {"hidden_size": 32, "num_layers": 1, "num_heads": 2}},
                }
            },
        },
        "recipe": {
            "quant_stage": {
                "quant_modifiers": {"GPTQModifier": {"config_groups": int8_channel_groups()}}
            }
        },
        "num_calibration_samples": 2,
        "max_seq_length": 16,
    }
    path = tmp_path / "compress.yaml"
    path.write_text(yaml.safe_dump(config))
    output_dir = _under_a_file(tmp_path)
    with pytest.raises(ExportError, match=rf"output directory '{output_dir}'"):
        main(["compress", "--config", str(path), "--output_dir", str(output_dir)])
    assert calibrations == []


def test_a_bad_batch_under_a_trainer_is_refused_naming_it(llama):
    """CalibrationModule under Trainer.validate reads batches lazily: each is checked on arrival."""
    ids = _with(token_ids(), VOCAB)
    before = snapshot(llama)
    trainer = Trainer(accelerator="cpu", inference_mode=False, enable_model_summary=False, **QUIET)
    loader = DataLoader(TensorDataset(ids, padding_mask()), batch_size=BATCH)
    with pytest.raises(ValueError, match=r"calibration batch 1, row 1: token id 128 is outside"):
        trainer.validate(CalibrationModule(llama, gptq()), dataloaders=loader, verbose=False)
    assert_untouched(llama, before)
