"""The ``lightning-compress`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loguru import logger

__all__ = ["main"]

# LightningCLI's subcommands, handled by ``lightning_compress.lightning.cli``.
TRAINER_COMMANDS = ("fit", "validate", "test", "predict", "compress")


def _quickstart(args: argparse.Namespace) -> None:
    from lightning_compress.bundled.quickstart import format_table, run_quickstart

    recipes = {Path(path).stem: path for path in args.recipe} if args.recipe else None
    rows = run_quickstart(recipes, num_windows=args.windows)
    print(
        f"Bundled tiny decoder, held-out perplexity on {args.windows} windows of 256 bytes "
        f"of Persuasion (never seen in training):\n"
    )
    print(format_table(rows))


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser.

    Returns:
        The parser with its subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-compress",
        description="Compress models. Also: lightning-compress compress --config CONFIG.yaml "
        "[--output_dir DIR] (one-shot compression, saved as a checkpoint transformers and vLLM "
        "load) and lightning-compress {fit,validate,test,predict} --config CONFIG.yaml "
        "(training); both are LightningCLI with the bundled model as default.",
    )
    parser.add_argument("--verbose", action="store_true", help="show the library's log")
    commands = parser.add_subparsers(dest="command", required=True)
    quickstart = commands.add_parser(
        "quickstart", help="compress the bundled model and compare perplexities"
    )
    quickstart.add_argument(
        "--recipe", action="append", help="a recipe file to run (repeatable); default: RTN presets"
    )
    quickstart.add_argument("--windows", type=int, default=16, help="evaluation windows")
    quickstart.set_defaults(run=_quickstart)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the command line.

    Args:
        argv: the arguments; ``sys.argv[1:]`` when None.
    """
    given = argv
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in TRAINER_COMMANDS:
        from lightning_compress.lightning.cli import run_cli

        _show_warnings_only()
        run_cli(given)  # None: LightningCLI reads sys.argv itself (no "args and argv" warning)
        return
    args = build_parser().parse_args(argv)
    if not args.verbose:
        _show_warnings_only()
    args.run(args)


def _show_warnings_only() -> None:
    """Keep the library's log to warnings and errors (its metrics go to DEBUG)."""
    logger.remove()
    logger.add(lambda message: print(message, end=""), level="WARNING")
