"""``lightning-compress evaluate``: perplexity and lm-evaluation-harness tasks of any model."""

from __future__ import annotations

from typing import Any

from jsonargparse import ArgumentParser

from lightning_compress.bundled import perplexity
from lightning_compress.cli_options import (
    add_model_options,
    apply_verbosity,
    command_parser,
)
from lightning_compress.evaluate import evaluation_samples, lm_eval_results
from lightning_compress.pretrained import default_seq_length, load_pretrained

__all__ = ["evaluate_parser", "run_evaluate"]

PROG = "lightning-compress evaluate"


def evaluate_parser() -> ArgumentParser:
    """The ``evaluate`` command's parser.

    Returns:
        The parser.
    """
    parser = command_parser(
        PROG,
        f"{PROG} [--model CHECKPOINT_DIR] [--dataset FILE] [--tasks TASK,...] [--include_path DIR] "
        f"[--config YAML] [options]",
        "Evaluate a causal LM, compressed (a compressed-tensors checkpoint) or not: perplexity "
        "on a data file (torchmetrics), and lm-evaluation-harness tasks with --tasks (the "
        "'eval' extra). Without --dataset or --tasks: perplexity on the bundled held-out text.",
    )
    add_model_options(parser)
    parser.add_argument(
        "--dataset",
        type=str | None,
        default=None,
        help="a .txt, .json, .jsonl, .parquet or .arrow file: perplexity on windows of its "
        "joined tokens",
    )
    parser.add_argument("--text_column", type=str, default="text", help="the records' text")
    parser.add_argument(
        "--max_seq_length",
        type=int | None,
        default=None,
        help="tokens per window; default: the model's context, at most 2048",
    )
    parser.add_argument(
        "--num_samples", type=int | None, default=None, help="windows; default: all"
    )
    parser.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", type=str | None, default=None, help="e.g. cuda")
    parser.add_argument(
        "--tasks",
        type=str | list[str] | None,
        default=None,
        help="lm-evaluation-harness tasks, comma-separated (a list in YAML)",
    )
    parser.add_argument(
        "--include_path", type=str | None, default=None, help="a directory of task YAML files"
    )
    parser.add_argument(
        "--limit", type=float | None, default=None, help="documents per task (below 1: a share)"
    )
    parser.add_argument("--num_fewshot", type=int | None, default=None)
    parser.add_argument(
        "--prefix_token_id",
        type=int | None,
        default=None,
        help="the token that starts a context; default: the tokenizer's BOS or EOS",
    )
    return parser


def run_evaluate(argv: list[str], verbose: bool = False) -> dict[str, Any]:
    """Run ``lightning-compress evaluate`` with ``argv`` and print what it measured.

    Args:
        argv: the command's arguments (after ``evaluate``).
        verbose: show the library's log even without ``--verbose``.

    Returns:
        ``{"perplexity": float}`` when perplexity was measured, and ``"tasks"``, the
        harness's per-task results, when tasks ran.
    """
    parser = evaluate_parser()
    config = parser.parse_args(argv)
    apply_verbosity(verbose or config.verbose)
    model, tokenizer = load_pretrained(config.model, config.dtype, config.tokenizer)
    if config.device is not None:
        model = model.to(config.device)
    tasks = config.tasks.split(",") if isinstance(config.tasks, str) else config.tasks
    measured: dict[str, Any] = {}
    if config.dataset is not None or not tasks:
        length = config.max_seq_length or default_seq_length(model)
        samples = evaluation_samples(
            config.dataset,
            tokenizer,
            model,
            length,
            config.num_samples,
            config.text_column,
        )
        measured["perplexity"] = perplexity(model, samples, config.batch_size)
        source = config.dataset or "the bundled evaluation text"
        print(
            f"Perplexity on {len(samples)} windows of {length} tokens of "
            f"{source}: {measured['perplexity']:.4f}"
        )
    if tasks:
        results = lm_eval_results(
            model,
            tokenizer,
            tasks,
            include_path=config.include_path,
            limit=_limit(config.limit),
            batch_size=config.batch_size,
            num_fewshot=config.num_fewshot,
            prefix_token_id=config.prefix_token_id,
        )
        from lm_eval.utils import make_table

        measured["tasks"] = results["results"]
        print(make_table(results))
    return measured


def _limit(limit: float | None) -> int | float | None:
    """A whole number of documents as an int (the harness reads a float as a share)."""
    return int(limit) if limit is not None and limit >= 1 else limit
