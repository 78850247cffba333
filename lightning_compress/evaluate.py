"""Evaluate a causal LM, compressed or not: perplexity on a data file, lm-evaluation-harness tasks.

Perplexity is torchmetrics' ``Perplexity`` over windows of a data file's tokens
(``calibration_samples`` reads the file). Tasks run through lm-evaluation-harness's Hugging
Face wrapper (``lm_eval.models.huggingface.HFLM``) from the ``eval`` extra:
``pip install "lightning-compress[eval]"``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from lightning_compress.bundled import bundled_text
from lightning_compress.pipelines.calibration_data import Sample, calibration_samples

__all__ = [
    "BUNDLED_EVALUATION_WINDOWS",
    "EVAL_EXTRA",
    "evaluation_samples",
    "lm_eval_results",
]

EVAL_EXTRA = 'pip install "lightning-compress[eval]"'
BUNDLED_EVALUATION_WINDOWS = 16


def evaluation_samples(
    dataset: str | os.PathLike | None,
    tokenizer: Any,
    model: nn.Module,
    max_seq_length: int,
    num_samples: int | None = None,
    text_column: str = "text",
) -> list[Sample]:
    """Windows of ``max_seq_length`` tokens of an evaluation data file, for ``perplexity``.

    The file's records are tokenized and joined, then cut into windows (as
    ``calibration_samples(..., concatenate_data=True)``), so every token but the first of each
    window is scored.

    Args:
        dataset: a ``.txt``, ``.json``, ``.jsonl``, ``.parquet`` or ``.arrow`` file (or a
            ``save_to_disk`` directory); None: the held-out part of the bundled text
            (:data:`BUNDLED_EVALUATION_WINDOWS` windows unless ``num_samples`` is set).
        tokenizer: the model's tokenizer.
        model: the model; ids are checked against its vocabulary and positions.
        max_seq_length: tokens per window.
        num_samples: windows from the start; None: all (the bundled text: 16).
        text_column: the records' text column.

    Returns:
        The windows.

    Raises:
        FileNotFoundError: if ``dataset`` does not exist.
        ValueError: for an unreadable file, or too little text for ``num_samples`` windows.
    """
    if dataset is None:
        text = bundled_text("evaluation")
        count = BUNDLED_EVALUATION_WINDOWS if num_samples is None else num_samples
        return calibration_samples(text, count, max_seq_length, tokenizer, model)
    return calibration_samples(
        Path(dataset),
        num_samples,
        max_seq_length,
        tokenizer,
        model,
        text_column=text_column,
        concatenate_data=True,
    )


def lm_eval_results(
    model: nn.Module,
    tokenizer: Any,
    tasks: list[str],
    include_path: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int = 1,
    num_fewshot: int | None = None,
    prefix_token_id: int | None = None,
) -> dict[str, Any]:
    """Run lm-evaluation-harness ``tasks`` on ``model`` through its Hugging Face wrapper.

    Args:
        model: a transformers ``PreTrainedModel`` (compressed or not).
        tokenizer: its tokenizer.
        tasks: task names, the harness's own or defined under ``include_path``.
        include_path: a directory of task YAML files (e.g. a task on a local JSONL file:
            ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``).
        limit: documents per task (a fraction below 1); None: all.
        batch_size: requests per forward pass.
        num_fewshot: few-shot examples per prompt; None: each task's own.
        prefix_token_id: the token that starts a context with nothing before it; None: the
            tokenizer's BOS or EOS token.

    Returns:
        The harness's results: ``{"results": {task: {metric: value}}, ...}``.

    Raises:
        ImportError: without the ``eval`` extra.
        TypeError: if ``model`` is not a transformers model.
        ValueError: for an empty task list, or a tokenizer with neither BOS nor EOS token and
            no ``prefix_token_id``.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError(
            f"tasks: lm-evaluation-harness is not installed ({error}); {EVAL_EXTRA}"
        ) from error
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"tasks: lm-evaluation-harness runs transformers models; got a "
            f"{type(model).__name__} (save it with save_compressed, then evaluate the directory)"
        )
    if not tasks:
        raise ValueError("tasks: expected at least one task name")
    has_prefix = tokenizer.bos_token_id is not None or tokenizer.eos_token_id is not None
    if prefix_token_id is None and not has_prefix:
        raise ValueError(
            "prefix_token_id: the tokenizer has neither a BOS nor an EOS token to start a "
            "context with; give the id of a token that starts a document"
        )
    wrapper = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        prefix_token_id=prefix_token_id,
    )
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    results = simple_evaluate(
        model=wrapper,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )
    if results is None:  # the harness returns None on ranks other than 0
        return {"results": {}}
    return results
