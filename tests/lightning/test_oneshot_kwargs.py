"""oneshot() called with llm-compressor's keyword arguments: each works the same or is refused."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from cli_checkpoints import RECORDS, save_checkpoint
from export_models import QUIET, tiny_model, token_ids
from helpers import int8_channel_groups
from loguru import logger
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_compress import oneshot
from lightning_compress.lightning.llmcompressor_keywords import (
    KEYWORDS,
    accepts_llmcompressor_keywords,
)
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

# llm-compressor 0.14's oneshot(): its signature and the dataclass fields it parses from kwargs.
LLMCOMPRESSOR_KEYWORDS = [
    "model",
    "config_name",
    "tokenizer",
    "processor",
    "precision",
    "tie_word_embeddings",
    "trust_remote_code_model",
    "save_compressed",
    "model_revision",
    "recipe",
    "recipe_args",
    "clear_sparse_session",
    "stage",
    "dataset",
    "dataset_config_name",
    "dataset_path",
    "splits",
    "batch_size",
    "data_collator",
    "num_calibration_samples",
    "shuffle_calibration_samples",
    "max_seq_length",
    "pad_to_max_length",
    "text_column",
    "concatenate_data",
    "streaming",
    "overwrite_cache",
    "preprocessing_num_workers",
    "dataloader_num_workers",
    "min_tokens_per_module",
    "moe_calibrate_all_experts",
    "pipeline",
    "tracing_ignore",
    "sequential_targets",
    "sequential_offload_device",
    "quantization_aware_calibration",
    "sequential_prefetch",
    "output_dir",
    "log_dir",
    "dvc_data_repository",
    "remove_columns",
    "preprocessing_func",
    "raw_kwargs",
    "sequential_targets_per_subgraph",
    "propagate_error",
    "use_loss_mask",
]
RTN = QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    yield messages
    logger.remove(sink)


def record(**arguments: Any) -> dict[str, Any]:
    """Stands in for oneshot's body: returns the arguments it would run with."""
    return arguments


record.__signature__ = inspect.signature(oneshot.__wrapped__)
translated = accepts_llmcompressor_keywords(record)


def test_every_llmcompressor_keyword_is_oneshots_own_or_read_by_the_table() -> None:
    own = set(inspect.signature(oneshot.__wrapped__).parameters)
    assert [name for name in LLMCOMPRESSOR_KEYWORDS if name not in own | set(KEYWORDS)] == []
    assert set(KEYWORDS) <= set(LLMCOMPRESSOR_KEYWORDS), "the table reads only their keywords"


def test_positional_order_stays_model_recipe_dataset_num_samples() -> None:
    arguments = translated(tiny_model(), RTN, token_ids(), 4)
    assert (arguments["recipe"], arguments["num_calibration_samples"]) == (RTN, 4)
    assert torch.equal(arguments["dataset"], token_ids())


def test_an_unknown_keyword_is_named_with_the_closest_valid_one() -> None:
    with pytest.raises(TypeError, match=r"\['num_calibration_sample'\]; did you mean"):
        oneshot(tiny_model(), RTN, num_calibration_sample=4)


@pytest.mark.parametrize(
    ("keyword", "value", "ours", "expected"),
    [
        ("stage", "quant", "recipe_stage", "quant"),
        ("propagate_error", False, "propagate_compressed", False),
        ("dataset_path", "data.jsonl", "dataset", "data.jsonl"),
        ("pipeline", "datafree", "pipeline", "data_free"),
        ("pipeline", "independent", "pipeline", "auto"),
        ("pipeline", None, "pipeline", "auto"),
        ("pipeline", "sequential", "pipeline", "sequential"),
        ("recipe_args", ["bits=4", "eq=a=b"], "recipe_args", {"bits": "4", "eq": "a=b"}),
        ("max_seq_length", None, "max_seq_length", 64),  # the model's max_position_embeddings
    ],
)
def test_llmcompressor_keywords_and_values_become_ours(keyword, value, ours, expected) -> None:
    assert translated(tiny_model(), RTN, **{keyword: value})[ours] == expected


def test_a_keyword_and_our_name_for_it_together_are_refused() -> None:
    with pytest.raises(ValueError, match="pass stage or recipe_stage, not both"):
        translated(tiny_model(), RTN, stage="a", recipe_stage="b")


@pytest.mark.parametrize(
    ("keyword", "same", "refused", "reason"),
    [
        ("save_compressed", True, False, "always gets a compressed-tensors checkpoint"),
        ("streaming", False, True, "nothing is downloaded here"),
        ("dataset_config_name", None, "wikitext-2", "nothing is downloaded here"),
        ("raw_kwargs", {}, {"name": "x"}, "nothing is downloaded here"),
        ("pad_to_max_length", False, True, "padded to their longest sample"),
        ("sequential_offload_device", "cpu", "cuda:1", "offload_dir"),
        ("sequential_targets_per_subgraph", 1, 2, "calibrated on its own"),
        ("trust_remote_code_model", False, True, "trust_remote_code=True"),
        ("config_name", None, "other/config", "config.json"),
        ("use_loss_mask", False, True, "every token of a sample counts"),
        ("min_tokens_per_module", None, 0.1, "falls back to its data-free method"),
        ("data_collator", "padding", "truncation", "padded to their longest sample"),
    ],
)
def test_a_value_that_means_what_happens_here_passes_and_another_is_refused(
    keyword, same, refused, reason
) -> None:
    translated(tiny_model(), RTN, **{keyword: same})
    with pytest.raises(ValueError, match=rf"^{keyword}=.*is not supported: .*{reason}"):
        translated(tiny_model(), RTN, batch_size=2, **{keyword: refused})


@pytest.mark.parametrize(
    ("keyword", "value", "warning"),
    [
        ("dataloader_num_workers", 4, "dataloader_num_workers=4 has no effect here"),
        ("preprocessing_num_workers", 4, "preprocessing_num_workers=4 has no effect here"),
        ("sequential_prefetch", True, "sequential_prefetch=True has no effect here"),
        ("overwrite_cache", True, "overwrite_cache=True has no effect here"),
        ("clear_sparse_session", False, "each oneshot call runs its own session"),
        ("tracing_ignore", ["f"], "tracing_ignore has no effect here"),
        ("quantization_aware_calibration", False, "is deprecated (in llm-compressor too)"),
        ("remove_columns", ["x"], "remove_columns is deprecated"),
    ],
)
def test_a_setting_without_effect_here_is_accepted_with_a_warning_naming_it(
    keyword, value, warning, warnings_logged
) -> None:
    translated(tiny_model(), RTN, **{keyword: value})
    assert any(warning in message for message in warnings_logged), warnings_logged


def test_a_model_name_that_is_neither_a_directory_nor_cached_is_refused() -> None:
    with pytest.raises(ValueError, match="no local directory and not in the Hugging Face cache"):
        oneshot("nobody/no-such-model", RTN)


def test_a_model_directory_is_loaded_with_its_tokenizer_in_the_precision_asked(
    checkpoint,
) -> None:
    arguments = translated(str(checkpoint), RTN, dataset=RECORDS, precision="bfloat16")
    assert arguments["model"].dtype == torch.bfloat16
    assert (
        arguments["tokenizer"].get_vocab() == AutoTokenizer.from_pretrained(checkpoint).get_vocab()
    )


def test_loading_settings_for_a_model_that_is_a_module_are_refused() -> None:
    with pytest.raises(ValueError, match="precision: applies to a model given as a path"):
        translated(tiny_model(), RTN, precision="half")


def test_tokenizer_and_processor_together_are_refused(checkpoint) -> None:
    with pytest.raises(ValueError, match="pass processor or tokenizer, not both"):
        translated(tiny_model(), RTN, tokenizer=str(checkpoint), processor=str(checkpoint))


def test_tie_word_embeddings_false_gives_the_head_its_own_weight() -> None:
    model = tiny_model("qwen2")  # ties its embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight
    translated(model, RTN, tie_word_embeddings=False)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_splits_select_a_slice_of_a_split_of_a_dataset_dict() -> None:
    rows = {"input_ids": token_ids(10).tolist()}
    data = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "test": datasets.Dataset.from_dict(rows)}
    )
    chosen = translated(tiny_model(), RTN, dataset=data, splits="test[20%:60%]")["dataset"]
    assert chosen["input_ids"] == rows["input_ids"][2:6]
    with pytest.raises(ValueError, match=r"'valid' is no split of the dataset; it has"):
        translated(tiny_model(), RTN, dataset=data, splits="valid")


def test_splits_of_data_that_has_none_are_refused() -> None:
    with pytest.raises(ValueError, match="splits select records of a datasets.Dataset"):
        translated(tiny_model(), RTN, dataset=token_ids(), splits="train[:4]")


def test_preprocessing_func_maps_each_record_before_tokenizing() -> None:
    rows = [{"ids": [1, 2, 3]}, {"ids": [4, 5]}]
    data = translated(tiny_model(), RTN, dataset=rows, preprocessing_func=_to_input_ids)["dataset"]
    assert data == [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}]


def _to_input_ids(record: dict[str, Any]) -> dict[str, Any]:
    return {"input_ids": record["ids"]}


def test_shuffled_calibration_samples_are_a_seeded_draw_from_all_samples() -> None:
    ids = torch.arange(40).reshape(20, 2)
    first = translated(tiny_model(), RTN, ids, 5, shuffle_calibration_samples=True)["dataset"]
    again = translated(tiny_model(), RTN, ids, 5, shuffle_calibration_samples=True)["dataset"]
    rows = [sample["input_ids"].tolist() for sample in first]
    assert rows == [sample["input_ids"].tolist() for sample in again]
    assert len({tuple(row) for row in rows}) == 5 and all(row in ids.tolist() for row in rows)
    assert rows != ids[:5].tolist()


def test_a_reference_style_call_calibrates_on_text_and_saves_with_the_tokenizer_and_a_log(
    checkpoint, tmp_path
) -> None:
    model = oneshot(
        model=str(checkpoint),
        dataset=RECORDS,
        recipe=GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
        max_seq_length=16,
        num_calibration_samples=4,
        output_dir=str(tmp_path / "out"),
        log_dir=str(tmp_path / "logs"),
        pipeline="independent",
        shuffle_calibration_samples=False,
        trainer_kwargs=QUIET,
        progress=False,
    )
    assert model.model.layers[0].mlp.up_proj.quantization_scheme is not None
    saved = tmp_path / "out"
    assert (saved / "config.json").is_file() and (saved / "tokenizer_config.json").is_file()
    (log,) = (tmp_path / "logs").glob("oneshot_*.log")
    assert "Initializing compression lifecycle" in log.read_text()  # a DEBUG line


def test_stage_runs_that_stage_and_saves_under_its_name(tmp_path) -> None:
    arguments = translated(tiny_model(), RTN, output_dir=tmp_path, stage="quant_stage")
    assert arguments["recipe_stage"] == "quant_stage"
    assert arguments["output_dir"] == tmp_path / "quant_stage"


def test_a_processor_object_tokenizes_and_is_saved(checkpoint) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert translated(tiny_model(), RTN, processor=tokenizer)["tokenizer"] is tokenizer


def test_datafree_reads_no_data_as_there(warnings_logged) -> None:
    arguments = translated(tiny_model(), RTN, token_ids(), pipeline="datafree")
    assert (arguments["pipeline"], arguments["dataset"]) == ("data_free", None)
    assert any("the dataset is not read" in message for message in warnings_logged)


def test_splits_as_a_calibration_mapping_is_deprecated_but_read(warnings_logged) -> None:
    data = datasets.Dataset.from_dict({"input_ids": token_ids(4).tolist()})
    chosen = translated(tiny_model(), RTN, data, splits={"calibration": "train[:1]"})["dataset"]
    assert len(chosen) == 1
    assert any("write splits='train[:1]'" in message for message in warnings_logged)


def test_malformed_values_are_refused_naming_the_keyword() -> None:
    with pytest.raises(ValueError, match="recipe_args: expected 'key=value' entries, got 'bits'"):
        translated(tiny_model(), RTN, recipe_args=["bits"])
    with pytest.raises(ValueError, match="precision: expected one of"):
        translated(tiny_model(), RTN, precision="int8")
    with pytest.raises(ValueError, match="splits: expected 'name' or 'name\\[start:stop\\]'"):
        translated(tiny_model(), RTN, dataset=datasets.Dataset.from_dict({"a": [1]}), splits="a b")


def test_a_module_loaded_from_a_directory_gets_that_directorys_tokenizer_to_save(
    checkpoint, tmp_path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    assert translated(model, RTN)["tokenizer"] is None  # neither data nor output_dir: not loaded
    tokenizer = translated(model, RTN, output_dir=tmp_path / "out")["tokenizer"]
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(checkpoint).get_vocab()


def test_a_revision_of_a_local_directory_is_refused(checkpoint) -> None:
    with pytest.raises(ValueError, match="model_revision='v1': revisions are of hub repositories"):
        translated(str(checkpoint), RTN, model_revision="v1")
