"""Options shared by the ``compress`` and ``evaluate`` commands."""

from __future__ import annotations

from typing import Literal

from jsonargparse import ActionConfigFile, ArgumentParser
from loguru import logger

from lightning_compress.core.verbosity import set_verbosity
from lightning_compress.pretrained import DTYPES

__all__ = ["add_flag", "add_model_options", "apply_verbosity", "command_parser"]

DETAILED_FORMAT = "{time:HH:mm:ss} | {level: <7} | {name}:{function}:{line} - {message}"
WARNING = logger.level("WARNING").no


def command_parser(prog: str, usage: str, description: str) -> ArgumentParser:
    """A command's parser, with ``--config`` (a YAML file of the same keys) and ``--verbose``.

    Args:
        prog: the command, e.g. ``lightning-compress evaluate``.
        usage: the usage line, the main options only.
        description: what it does.

    Returns:
        The parser.
    """
    parser = ArgumentParser(prog=prog, usage=usage, description=description)
    parser.add_argument(
        "--config", action=ActionConfigFile, help="a YAML file with any of the options below"
    )
    add_flag(parser, "--verbose", "show the library's log (per-layer metrics, Lightning's info)")
    return parser


def add_flag(parser: ArgumentParser, name: str, help: str, default: bool = False) -> None:
    """A boolean option that works bare (``--name``) and with a value (``--name false``).

    Args:
        parser: the parser.
        name: the option, e.g. ``--overwrite_output_dir``.
        help: what it does.
        default: its value when not given.
    """
    parser.add_argument(name, type=bool, nargs="?", const=True, default=default, help=help)


def add_model_options(parser: ArgumentParser, modules: bool = False) -> None:
    """``--model``, ``--dtype`` and ``--tokenizer``.

    Args:
        parser: the parser.
        modules: ``--model`` also takes a ``{class_path, init_args}`` module.
    """
    module = "; in a YAML config also a {class_path, init_args} module" if modules else ""
    parser.add_argument(
        "--model",
        type=str | dict | None if modules else str | None,
        default=None,
        help=f"a local transformers checkpoint directory (plain or compressed-tensors){module}; "
        f"default: the bundled tiny model",
    )
    parser.add_argument(
        "--dtype",
        type=Literal[DTYPES] | None,
        default=None,
        help="load the model in this dtype; default: the checkpoint's",
    )
    parser.add_argument(
        "--tokenizer",
        type=str | None,
        default=None,
        help="the tokenizer's directory; default: the model's",
    )


def apply_verbosity(verbose: bool) -> None:
    """Print the library's log from INFO (the run summary, warnings), or DEBUG if ``verbose``.

    ``verbose`` also sets ``set_verbosity("debug")``: per-layer metrics and Lightning's own
    messages show.

    Args:
        verbose: show everything the library and Lightning log.
    """
    set_verbosity("debug" if verbose else "info")
    logger.remove()
    logger.add(
        lambda message: print(message, end=""),
        level="DEBUG" if verbose else "INFO",
        format=DETAILED_FORMAT if verbose else _plain_format,
    )


def _plain_format(record: dict) -> str:
    """INFO messages as they are (the run summary), warnings and errors with their level."""
    return "{message}\n" if record["level"].no < WARNING else "{level}: {message}\n{exception}"
