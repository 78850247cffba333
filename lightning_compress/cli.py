"""The ``lightning-compress`` command: ``compress``, ``evaluate``, ``quickstart`` and training."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from lightning_compress.cli_options import apply_verbosity

__all__ = ["COMMANDS", "build_parser", "main"]

# LightningCLI's subcommands, handled by ``lightning_compress.lightning.cli``.
TRAINER_COMMANDS = ("fit", "validate", "test", "predict")
COMMANDS = {
    "compress": "compress a model (a local transformers checkpoint or the bundled one) with a "
    "recipe, one-shot, and save it for transformers and vLLM",
    "evaluate": "perplexity on a data file, and lm-evaluation-harness tasks, of any model, "
    "compressed or not",
    "quickstart": "compress the bundled model with several recipes and compare perplexities",
    "fit": "train with compression (LightningCLI; add a Compressor to trainer.callbacks)",
    "validate": "validate a model (LightningCLI)",
    "test": "test a model (LightningCLI)",
    "predict": "predict with a model (LightningCLI)",
}
VERBOSE = "--verbose"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser: every subcommand, and the ``quickstart`` command's options.

    ``compress``, ``evaluate`` and the training commands parse their own options (run
    ``lightning-compress COMMAND --help``).

    Returns:
        The parser with its subcommands.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-compress",
        description="Quantize, prune and distil models with PyTorch Lightning. "
        "Run 'lightning-compress COMMAND --help' for a command's options.",
    )
    parser.add_argument(VERBOSE, action="store_true", help="show the library's log")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in COMMANDS.items():
        if name != "quickstart":
            commands.add_parser(name, help=summary, add_help=False)
    quickstart = commands.add_parser(
        "quickstart", help=COMMANDS["quickstart"], description=COMMANDS["quickstart"]
    )
    quickstart.add_argument(
        "--recipe",
        action="append",
        help="a recipe file to run (repeatable; calibrated recipes calibrate on the bundled "
        "text); default: RTN presets",
    )
    quickstart.add_argument("--windows", type=int, default=16, help="evaluation windows")
    quickstart.add_argument(VERBOSE, action="store_true", help="show the library's log")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the command line.

    ``--verbose`` may come before or after the subcommand.

    Args:
        argv: the arguments; ``sys.argv[1:]`` when None.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while args and args[0] == VERBOSE:
        verbose = True
        args.pop(0)
    command = args[0] if args else None
    runners: dict[str, Callable[[list[str], bool], None]] = {
        "compress": _compress,
        "evaluate": _evaluate,
        **dict.fromkeys(TRAINER_COMMANDS, _train),
    }
    if command in runners:
        runners[command](args, verbose)
        return
    parsed = build_parser().parse_args(args)
    apply_verbosity(verbose or parsed.verbose)
    _quickstart(parsed)


def run() -> None:
    """The ``lightning-compress`` program: :func:`main`, with refused input said in one line.

    A recipe, data file, checkpoint or output directory the library refuses (a ``ValueError``,
    ``TypeError`` or ``OSError`` such as ``RecipeError``, ``ExportError`` or
    ``FileNotFoundError``) ends the program with its message on stderr and exit status 1; with
    ``--verbose`` the traceback is shown instead.
    """
    try:
        main()
    except (ValueError, TypeError, OSError) as error:
        if _asks_verbose(sys.argv[1:]):
            raise
        command = Path(sys.argv[0]).name
        print(f"{command}: error: {error}\n(--verbose shows the traceback)", file=sys.stderr)
        sys.exit(1)


def _asks_verbose(args: list[str]) -> bool:
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag == VERBOSE and value.lower() not in ("false", "0", "no"):
            return True
    return False


def _compress(args: list[str], verbose: bool) -> None:
    from lightning_compress.lightning.compress_command import run_compress

    run_compress(args[1:], verbose)


def _evaluate(args: list[str], verbose: bool) -> None:
    from lightning_compress.evaluate_command import run_evaluate

    run_evaluate(args[1:], verbose)


def _train(args: list[str], verbose: bool) -> None:
    """LightningCLI's ``fit``/``validate``/``test``/``predict``, with ``--verbose`` taken out."""
    from lightning_compress.lightning.cli import run_cli

    kept = [arg for arg in args if arg != VERBOSE]
    apply_verbosity(verbose or len(kept) < len(args))
    with warnings.catch_warnings():
        # the arguments are given on purpose (without --verbose), not mixed with sys.argv
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        run_cli(kept)


def _quickstart(args: argparse.Namespace) -> None:
    from lightning_compress.lightning.quickstart import format_table, run_quickstart

    recipes = {Path(path).stem: path for path in args.recipe} if args.recipe else None
    rows = run_quickstart(recipes, num_windows=args.windows)
    print(
        f"Bundled tiny decoder, held-out perplexity on {args.windows} windows of 256 bytes "
        f"of Persuasion (never seen in training):\n"
    )
    print(format_table(rows))
