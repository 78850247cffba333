"""``lightning-compress evaluate``: perplexity of any checkpoint; lm-evaluation-harness tasks."""

from __future__ import annotations

import json
import math
import re
import sys
from functools import partial

import pytest
import torch
from cli_checkpoints import RECORDS
from helpers import int8_channel_groups
from transformers import AutoModelForCausalLM

from lightning_compress.bundled.tokenizer import byte_tokenizer_fast
from lightning_compress.cli import main
from lightning_compress.evaluate import evaluation_samples
from lightning_compress.evaluate_command import run_evaluate
from lightning_compress.export import save_compressed
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.pretrained import load_pretrained

WINDOW = 32


def reference_perplexity(model: torch.nn.Module, ids: list[int], window: int) -> float:
    """exp(sum of next-token NLLs / their count), one window and one position at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - window + 1, window):
            chunk = torch.tensor([ids[start : start + window]])
            log_probs = model(chunk).logits[0].double().log_softmax(-1)
            for position in range(window - 1):
                total -= float(log_probs[position, chunk[0, position + 1]])
                count += 1
    return math.exp(total / count)


def joined_bytes(texts: list[str]) -> list[int]:
    return [byte for text in texts for byte in text.encode("utf-8")]


def printed_perplexity(out: str) -> tuple[int, float]:
    match = re.search(r"Perplexity on (\d+) windows of \d+ tokens of .*: ([\d.]+)", out)
    assert match is not None, out
    return int(match[1]), float(match[2])


def test_perplexity_of_a_checkpoint_equals_a_direct_computation(checkpoint, jsonl, capsys):
    data = jsonl()
    measured = run_evaluate(
        ["--model", str(checkpoint), "--dataset", str(data), "--max_seq_length", str(WINDOW)]
    )
    ids = joined_bytes(RECORDS)
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    expected = reference_perplexity(model, ids, WINDOW)
    assert measured["perplexity"] == pytest.approx(expected, rel=1e-5)
    windows, printed = printed_perplexity(capsys.readouterr().out)
    assert windows == len(ids) // WINDOW
    assert printed == pytest.approx(expected, rel=1e-3)


def test_perplexity_of_a_compressed_checkpoint_is_the_compressed_models(
    checkpoint, jsonl, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    oneshot(model, QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]))
    save_compressed(model, tmp_path / "w8", byte_tokenizer_fast())
    config = json.loads((tmp_path / "w8" / "config.json").read_text())
    assert "quantization_config" in config
    data = jsonl(texts=RECORDS * 2)
    measured = run_evaluate(
        ["--model", str(tmp_path / "w8"), "--dataset", str(data), "--max_seq_length", "48"]
    )
    expected = reference_perplexity(model, joined_bytes(RECORDS * 2), 48)
    assert measured["perplexity"] == pytest.approx(expected, rel=1e-5)
    original = reference_perplexity(
        AutoModelForCausalLM.from_pretrained(checkpoint), joined_bytes(RECORDS * 2), 48
    )
    assert measured["perplexity"] != pytest.approx(original, rel=1e-7)


def test_evaluate_reads_a_text_column_by_name(checkpoint, jsonl):
    data = jsonl(column="body")
    argv = ["--model", str(checkpoint), "--dataset", str(data), "--max_seq_length", "16"]
    with pytest.raises(TypeError, match="text"):
        run_evaluate(argv)
    by_name = run_evaluate([*argv, "--text_column", "body"])["perplexity"]
    expected = reference_perplexity(
        AutoModelForCausalLM.from_pretrained(checkpoint), joined_bytes(RECORDS), 16
    )
    assert by_name == pytest.approx(expected, rel=1e-5)


def test_evaluate_is_a_subcommand_of_the_command_line(checkpoint, jsonl, capsys):
    main(["evaluate", "--model", str(checkpoint), "--dataset", str(jsonl()), "--num_samples", "2"])
    assert printed_perplexity(capsys.readouterr().out)[0] == 2


def test_a_missing_model_directory_is_named_in_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=rf"model: '{missing}' is no directory"):
        run_evaluate(["--model", str(missing)])


# ------------------------------------------------------------ lm-evaluation-harness
TASK = """task: tiny_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
metadata:
  version: 1.0
"""
DOCS = [
    {"question": "It is a truth universally", "choices": [" acknowledged", " denied"], "label": 0},
    {"question": "a single man in", "choices": [" want", " possession"], "label": 1},
    {"question": "must be in want of a", "choices": [" wife", " horse"], "label": 0},
    {"question": "the rightful property of", "choices": [" nobody", " some one"], "label": 1},
]
PREFIX = 10  # the byte tokenizer has no BOS/EOS: a newline starts each context


def choice_log_likelihood(model: torch.nn.Module, context: str, choice: str) -> float:
    """log p(choice | newline + context), summed over the choice's bytes."""
    ids = [PREFIX, *context.encode()]
    target = list(choice.encode())
    with torch.no_grad():
        logits = model(torch.tensor([ids + target])).logits[0].double().log_softmax(-1)
    return sum(float(logits[len(ids) - 1 + i, token]) for i, token in enumerate(target))


def _choice(doc: dict, index: int) -> tuple[str, str]:
    return doc["question"], doc["choices"][index]


def test_an_lm_eval_task_from_local_files_scores_like_a_direct_computation(
    checkpoint, tmp_path, capsys, monkeypatch
):
    tasks = pytest.importorskip("lm_eval.tasks", reason="needs the eval extra")
    # The harness's own tasks stay unindexed (parsing their thousands of YAML files takes
    # seconds); the local task is found through --include_path as before.
    monkeypatch.setattr(tasks, "TaskManager", partial(tasks.TaskManager, include_defaults=False))
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tiny_choice.yaml").write_text(TASK.format(data=data))
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    argv = ["--model", str(checkpoint), "--tasks", "tiny_choice", "--include_path", str(tmp_path)]
    measured = run_evaluate([*argv, "--prefix_token_id", str(PREFIX), "--batch_size", "2"])
    assert "perplexity" not in measured  # tasks without --dataset: no perplexity
    assert re.search(r"tiny_choice\s*\|.*\|acc", capsys.readouterr().out)
    correct = [
        max(
            range(2), key=lambda i: choice_log_likelihood(model, doc["question"], doc["choices"][i])
        )
        == doc["label"]
        for doc in DOCS
    ]
    assert measured["tasks"]["tiny_choice"]["acc,none"] == pytest.approx(sum(correct) / len(DOCS))


def test_tasks_without_the_eval_extra_name_it(checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"lightning-compress\[eval\]"):
        run_evaluate(["--model", str(checkpoint), "--tasks", "hellaswag"])


def test_tasks_without_a_context_start_token_are_refused_naming_the_option(checkpoint):
    pytest.importorskip("lm_eval", reason="needs the eval extra")
    with pytest.raises(ValueError, match="prefix_token_id"):
        run_evaluate(["--model", str(checkpoint), "--tasks", "hellaswag"])


def test_records_shorter_than_a_window_are_joined_into_full_windows(checkpoint, jsonl):
    model, tokenizer = load_pretrained(checkpoint)
    windows = evaluation_samples(jsonl(), tokenizer, model, max_seq_length=128)
    ids = torch.tensor(joined_bytes(RECORDS))
    assert all(len(text.encode()) < 128 for text in RECORDS)
    assert [len(window["input_ids"]) for window in windows] == [128] * (len(ids) // 128)
    assert torch.equal(torch.cat([w["input_ids"] for w in windows]), ids[: len(windows) * 128])
