"""Faults at the command line: every bad checkpoint, data file, option or recipe is refused with
an error naming it, before anything is compressed or written."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import yaml
from cli_checkpoints import (  # noqa: F401 (an autouse fixture)
    RECORDS,
    log_settings_restored,
    save_checkpoint,
    write_jsonl,
)
from helpers import int8_channel_groups

from lightning_compress.cli import main
from lightning_compress.evaluate_command import run_evaluate
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.lightning.compress_command import compress_parser, run_compress
from lightning_compress.recipe import RecipeError

SEED = 16
GPTQ = yaml.safe_dump(
    {
        "quant_modifiers": {
            "GPTQModifier": {"config_groups": int8_channel_groups(), "ignore": ["lm_head"]}
        }
    }
)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("good"))


@pytest.fixture
def calibrations(monkeypatch):
    """Counts calibrations started, to show a fault stopped the run before any."""
    started: list[int] = []
    prepare = CalibrationModule._prepare
    monkeypatch.setattr(
        CalibrationModule,
        "_prepare",
        lambda self, *args, **kwargs: started.append(1) or prepare(self, *args, **kwargs),
    )
    return started


def _copy(good, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(good, broken)
    return broken


def _truncated_config(good, tmp_path, rng):
    broken = _copy(good, tmp_path)
    text = (broken / "config.json").read_text()
    (broken / "config.json").write_text(text[: rng.randrange(1, len(text) - 1)])
    return broken


def _no_tokenizer(good, tmp_path, rng):
    broken = _copy(good, tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (broken / name).unlink(missing_ok=True)
    return broken


BROKEN_MODELS = {
    "missing": (lambda good, tmp, rng: tmp / "nowhere", FileNotFoundError, "no directory"),
    "a file": (
        lambda good, tmp, rng: (tmp / "model.bin").write_bytes(b"\0") and tmp / "model.bin",
        FileNotFoundError,
        "is no directory",
    ),
    "no config.json": (
        lambda good, tmp, rng: (tmp / "empty").mkdir() or tmp / "empty",
        FileNotFoundError,
        "config.json",
    ),
    "truncated config.json": (_truncated_config, ValueError, r"config.json is not valid JSON"),
    "config.json not an object": (
        lambda good, tmp, rng: (
            _copy(good, tmp).joinpath("config.json").write_text("[1]") and tmp / "model"
        ),
        ValueError,
        "holds a list; expected an object",
    ),
    "no tokenizer": (_no_tokenizer, ValueError, "tokenizer: no tokenizer could be loaded"),
}


@pytest.mark.parametrize("fault", BROKEN_MODELS)
@pytest.mark.parametrize("command", ["compress", "evaluate"])
def test_a_broken_checkpoint_is_refused_naming_it(fault, command, good, tmp_path, calibrations):
    make, error, message = BROKEN_MODELS[fault]
    model = make(good, tmp_path, random.Random(f"{SEED}-{fault}"))
    argv = ["--model", str(model)]
    if command == "compress":
        argv += ["--recipe", GPTQ, "--output_dir", str(tmp_path / "out")]
    with pytest.raises(error, match=message):
        main([command, *argv])
    assert calibrations == [] and not (tmp_path / "out").exists()


def _corrupt_line(path, rng):
    lines = path.read_text().splitlines()
    index = rng.randrange(len(lines))
    lines[index] = lines[index][: rng.randrange(1, len(lines[index]) - 1)]
    path.write_text("\n".join(lines) + "\n")
    return index


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("option", ["--dataset", "--eval_dataset"])
def test_a_corrupted_data_file_fails_before_calibrating_naming_the_file(
    option, seed, good, tmp_path, calibrations
):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS * 4)
    _corrupt_line(data, random.Random(SEED * 100 + seed))
    argv = ["--model", str(good), "--recipe", GPTQ, option, str(data), "--max_seq_length", "16"]
    with pytest.raises(ValueError, match=r"data\.jsonl"):
        run_compress([*argv, "--output_dir", str(tmp_path / "out")])
    assert calibrations == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "error", "message"),
    [
        ("missing.jsonl", None, FileNotFoundError, "missing.jsonl"),
        ("data.csv", "text\nhello world\n", ValueError, r"suffix '\.csv'"),
        ("empty.jsonl", "", ValueError, "holds no records"),
        ("wrong_column.jsonl", json.dumps({"body": "some text"}) + "\n", TypeError, "text"),
        ("not_records.json", "[1, 2, 3]", TypeError, r"not_records\.json record 0"),
    ],
)
@pytest.mark.parametrize("option", ["--dataset", "--eval_dataset"])
def test_a_bad_data_file_is_refused_naming_it(
    option, name, content, error, message, good, tmp_path, calibrations
):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    argv = ["--model", str(good), "--recipe", GPTQ, option, str(path), "--max_seq_length", "16"]
    with pytest.raises(error, match=message):
        run_compress([*argv, "--output_dir", str(tmp_path / "out")])
    assert calibrations == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--dtype", "fp8"], "dtype"),
        (["--pipeline", "fastest"], "pipeline"),
        (["--max_seq_length", "many"], "max_seq_length"),
        (["--overwrite_output_dir", "maybe"], "overwrite_output_dir"),
        (["--no_such_option", "1"], "no_such_option"),
    ],
)
def test_a_bad_option_value_exits_with_usage_naming_the_option(argv, named, good, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model", str(good), "--recipe", GPTQ, *argv])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


def test_a_missing_recipe_is_named():
    with pytest.raises(SystemExit) as exit_info:
        compress_parser().parse_args([])
    assert exit_info.value.code == 2


def test_a_bad_recipe_is_refused_before_calibrating(good, tmp_path, calibrations):
    recipe = yaml.safe_dump(
        {"quant_modifiers": {"GPTQModifer": {"config_groups": int8_channel_groups()}}}
    )
    with pytest.raises(RecipeError, match="GPTQModifer"):
        run_compress(["--model", str(good), "--recipe", recipe, "--output_dir", f"{tmp_path}/o"])
    assert calibrations == [] and not (tmp_path / "o").exists()


def test_evaluate_refuses_a_window_longer_than_the_model_naming_the_option(good, tmp_path):
    data = write_jsonl(tmp_path / "data.jsonl", RECORDS)
    with pytest.raises(ValueError, match="max_seq_length"):
        run_evaluate(["--model", str(good), "--dataset", str(data), "--max_seq_length", "4096"])
