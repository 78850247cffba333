"""The command line's surface: help, flags, errors that name real flags, ``--verbose``."""

from __future__ import annotations

import re

import pytest
import yaml
from cli_checkpoints import save_checkpoint
from helpers import int8_channel_groups
from loguru import logger

from lightning_compress.cli import COMMANDS, main, run
from lightning_compress.lightning.compress_command import compress_parser
from lightning_compress.recipe import RecipeError

TRAINING = ("fit", "validate", "test", "predict")
RTN = yaml.safe_dump(
    {"q_modifiers": {"QuantizationModifier": {"config_groups": int8_channel_groups()}}}
)


def help_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    out = help_of(["--help"], capsys)
    for command in ("compress", "evaluate", "quickstart", *TRAINING):
        assert re.search(rf"^\s+{command}\b", out, re.MULTILINE), command
    assert set(COMMANDS) == {
        "compress",
        "evaluate",
        "quickstart",
        "fit",
        "validate",
        "test",
        "predict",
    }


def test_compress_help_shows_the_compression_options_before_the_trainers(capsys):
    out = help_of(["compress", "--help"], capsys)
    usage, _, options = out.partition("options:")
    assert "--trainer.accelerator" not in usage  # the usage line names the main options only
    trainer = options.index("--trainer.accelerator")
    for option in (
        "--model",
        "--recipe",
        "--dataset",
        "--text_column",
        "--eval_dataset",
        "--output_dir",
        "--overwrite_output_dir",
        "--dtype",
        "--verbose",
    ):
        assert options.index(option) < trainer, option


# an option only each command's own help shows
OWN_OPTION = {
    "compress": "--eval_dataset",
    "evaluate": "--tasks",
    "quickstart": "--windows",
    **dict.fromkeys(TRAINING, "--trainer.max_epochs"),
}


def test_every_subcommand_has_its_own_help(capsys):
    for command in COMMANDS:
        out = help_of([command, "--help"], capsys)
        assert OWN_OPTION[command] in out, command


@pytest.fixture
def model_dir(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("model"))


def test_boolean_options_work_as_bare_flags(model_dir, tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "old.txt").write_text("an older run")
    argv = ["--model", str(model_dir), "--recipe", RTN, "--output_dir", str(output_dir)]
    main(["compress", *argv, "--overwrite_output_dir"])
    assert (output_dir / "config.json").exists() and not (output_dir / "old.txt").exists()
    parsed = compress_parser().parse_args(["--recipe", RTN, "--staged", "--verbose"])
    assert parsed.staged is True and parsed.verbose is True and parsed.overwrite_output_dir is False
    parsed = compress_parser().parse_args(["--recipe", RTN, "--staged", "false"])
    assert parsed.staged is False


def test_the_occupied_output_dir_error_names_a_flag_that_exists(model_dir, tmp_path, capsys):
    (tmp_path / "old.txt").write_text("an older run")
    argv = ["--model", str(model_dir), "--recipe", RTN, "--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", *argv])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    named = set(re.findall(r"--\w+", error.split("error:")[-1]))
    assert "--overwrite_output_dir" in named
    known = {option for action in compress_parser()._actions for option in action.option_strings}
    assert named <= known, named - known
    assert (tmp_path / "old.txt").exists() and not (tmp_path / "config.json").exists()


PER_LAYER_METRIC = "QuantizationError/model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("where", ["before the command", "after the command", "as --verbose=true"])
def test_verbose_works_on_compress_wherever_it_is_given(where, model_dir, capsys):
    argv = ["--model", str(model_dir), "--recipe", RTN, "--max_seq_length", "16"]
    if where == "before the command":
        main(["--verbose", "compress", *argv])
    elif where == "after the command":
        main(["compress", "--verbose", *argv])
    else:
        main(["compress", *argv, "--verbose=true"])
    assert PER_LAYER_METRIC in capsys.readouterr().out


def test_without_verbose_the_run_prints_its_summary_and_no_per_layer_metric(model_dir, capsys):
    main(["compress", "--model", str(model_dir), "--recipe", RTN, "--max_seq_length", "16"])
    out = capsys.readouterr().out
    assert "compression summary:" in out and "compressed 15 of 15 linear layers" in out
    assert PER_LAYER_METRIC not in out
    logger.warning("a warning still shows")
    assert "WARNING: a warning still shows" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["evaluate", "quickstart", *TRAINING])
def test_verbose_is_accepted_by_every_subcommand(command, capsys):
    for argv in (["--verbose", command, "--help"], [command, "--verbose", "--help"]):
        assert OWN_OPTION[command] in help_of(argv, capsys)


def test_a_nested_model_flag_gets_a_short_error_naming_the_model_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--model.model", "/some/checkpoint", "--recipe", RTN])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.split("error:")[-1].strip()
    assert "--model PATH" in error and len(error.splitlines()) == 1


MISSPELLED = yaml.safe_dump(
    {"q_modifiers": {"GPTQModifer": {"config_groups": int8_channel_groups()}}}
)


def test_the_program_says_a_refused_recipe_in_one_line(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["lightning-compress", "compress", "--recipe", MISSPELLED])
    with pytest.raises(SystemExit) as exit_info:
        run()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("lightning-compress: error: ") and "Traceback" not in err
    assert "unknown modifier 'GPTQModifer'" in err and "did you mean 'GPTQModifier'" in err


@pytest.mark.parametrize("flag", ["--verbose", "--verbose=true"])
def test_the_program_shows_the_traceback_with_verbose(flag, monkeypatch):
    argv = ["lightning-compress", "compress", "--recipe", MISSPELLED, flag]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(RecipeError, match="unknown modifier 'GPTQModifer'"):
        run()
