"""``lightning-compress compress``: one-shot compression of a checkpoint, from flags or YAML."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from jsonargparse import ArgumentError, ArgumentParser, Namespace
from torch import nn

from lightning_compress.bundled import TinyDecoder, bundled_text, load_tokenizer, perplexity
from lightning_compress.cli_options import (
    add_flag,
    add_model_options,
    apply_verbosity,
    command_parser,
)
from lightning_compress.core.distributed import rank_and_world_size
from lightning_compress.evaluate import evaluation_samples
from lightning_compress.lightning.cli import language_model
from lightning_compress.lightning.model_free_command import add_model_free_options, run_model_free
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.lightning.out_of_core_choice import choose_out_of_core
from lightning_compress.pipelines.calibration_data import Sample
from lightning_compress.pipelines.checkpoint_source import CheckpointSource
from lightning_compress.pretrained import default_seq_length, load_pretrained, torch_dtype
from lightning_compress.summary import CompressionSummary

__all__ = ["compress_parser", "run_compress"]

PROG = "lightning-compress compress"
USAGE = (
    f"{PROG} --recipe RECIPE [--model CHECKPOINT_DIR] [--dataset FILE] [--text_column NAME] "
    f"[--eval_dataset FILE] [--output_dir DIR] [--overwrite_output_dir] [--model_free] "
    f"[--workers N] [--config YAML] "
    f"[options] [--trainer.* ...]"
)
BUNDLED_EVALUATION_SEQ_LEN = 256


def compress_parser() -> ArgumentParser:
    """The ``compress`` command's parser: compression options first, the Trainer's last.

    Returns:
        The parser.
    """
    parser = command_parser(
        PROG,
        USAGE,
        "Compress a causal LM after training (one-shot, calibrated where the recipe needs it) "
        "and save it as a compressed-tensors checkpoint that transformers and vLLM load. "
        "Every option is also a key of a --config YAML file.",
    )
    add_model_options(parser, modules=True)
    parser.add_argument(
        "--recipe", type=Any, required=True, help="a recipe file, or the recipe (YAML/mapping)"
    )
    parser.add_argument(
        "--recipe_stage", type=str | list[str] | None, default=None, help="the stage(s) to run"
    )
    parser.add_argument(
        "--recipe_args", type=dict | None, default=None, help="values for ${args.name}"
    )
    parser.add_argument(
        "--dataset",
        type=str | None,
        default=None,
        help="calibration data: a .txt, .json, .jsonl, .parquet or .arrow file, or a "
        "datasets.save_to_disk directory; default: the bundled calibration text",
    )
    parser.add_argument("--text_column", type=str, default="text", help="the records' text")
    parser.add_argument(
        "--concatenate_data",
        type=bool | None,
        default=None,
        help="join the records' tokens into windows (default: for .txt only)",
    )
    parser.add_argument(
        "--num_calibration_samples",
        type=int | None,
        default=64,
        help="samples from the start of the data; null: all",
    )
    parser.add_argument(
        "--max_seq_length",
        type=int | None,
        default=None,
        help="tokens per sample; default: the model's context, at most 2048",
    )
    parser.add_argument("--batch_size", type=int, default=1, help="samples per batch")
    parser.add_argument(
        "--pipeline",
        type=Literal["auto", "sequential", "basic", "data_free"],
        default="auto",
        help="auto: data_free where no modifier needs data, else sequential (block by block)",
    )
    parser.add_argument(
        "--sequential_targets",
        type=str | list[str] | None,
        default=None,
        help="class names of the blocks calibrated one at a time (comma-separated)",
    )
    parser.add_argument("--device", type=str | None, default=None, help="where blocks run")
    parser.add_argument(
        "--offload_dir", type=str | None, default=None, help="spill the activation cache here"
    )
    add_flag(parser, "--propagate_compressed", "feed blocks compressed outputs", default=True)
    add_flag(parser, "--staged", "calibrate blocks in one staged forward", default=True)
    add_flag(
        parser,
        "--moe_calibrate_all_experts",
        "calibrate every expert on every token (false: on its routed tokens)",
        default=True,
    )
    parser.add_argument(
        "--output_dir", type=str | None, default=None, help="save the compressed model here"
    )
    add_flag(parser, "--overwrite_output_dir", "replace --output_dir if it is not empty")
    parser.add_argument(
        "--out_of_core",
        type=bool | Literal["auto"],
        nargs="?",
        const=True,
        default="auto",
        help="compress --model (a checkpoint directory) one decoder block in memory at a time, "
        "writing each to --output_dir as it is done; a stopped run resumes when started "
        "again. auto (default): when the weights take more than half the available memory "
        "and --output_dir is given",
    )
    add_flag(
        parser,
        "--strict",
        "refuse, before compressing, a recipe that leaves a weight of the decoder blocks "
        "neither targeted nor ignored, or whose ignore matches nothing",
    )
    parser.add_argument(
        "--eval_dataset",
        type=str | None,
        default=None,
        help="print perplexity before and after on this data file (windows of "
        "--max_seq_length tokens); default: the bundled text for the bundled model",
    )
    parser.add_argument(
        "--eval_samples", type=int | None, default=None, help="evaluation windows; default: all"
    )
    parser.add_argument("--seed_everything", type=int | None, default=0, help="random seed")
    add_model_free_options(parser)
    parser.add_class_arguments(
        pl.Trainer, "trainer", skip={"inference_mode"}, instantiate=False, fail_untyped=False
    )
    parser.groups["trainer"].title = "Lightning Trainer that runs the calibration (optional)"
    parser.groups["trainer"].description = None
    return parser


def run_compress(argv: list[str], verbose: bool = False) -> nn.Module | None:
    """Run ``lightning-compress compress`` with ``argv``.

    Args:
        argv: the command's arguments (after ``compress``).
        verbose: show the library's log even without ``--verbose``.

    Returns:
        The compressed model (None with ``--model_free``, which builds none).
    """
    parser = compress_parser()
    config = parser.parse_args(argv)
    apply_verbosity(verbose or config.verbose)
    _check_output_dir(parser, config)
    if config.model_free:
        run_model_free(parser, config)
        return None
    if config.seed_everything is not None:
        pl.seed_everything(config.seed_everything, verbose=False)
    summary = CompressionSummary()
    config.out_of_core = _out_of_core(config)
    with summary.phase("load"):
        if config.out_of_core:
            source, tokenizer = _checkpoint_source(parser, config)
            model = source.model
        else:
            model, tokenizer = _model(parser, config)
    if config.max_seq_length is None:
        config.max_seq_length = default_seq_length(model)
    evaluation, label = _evaluation(config, model, tokenizer)
    before = after = None
    if evaluation is not None:
        with summary.phase("evaluate"):
            before = perplexity(model, evaluation)
    dataset = config.dataset if config.dataset is not None else bundled_text("calibration")
    compressed = oneshot(
        source if config.out_of_core else model,
        config.recipe,
        dataset,
        num_calibration_samples=config.num_calibration_samples,
        max_seq_length=config.max_seq_length,
        output_dir=config.output_dir,
        pipeline=config.pipeline,
        sequential_targets=_names(config.sequential_targets),
        batch_size=config.batch_size,
        device=config.device,
        offload_dir=config.offload_dir,
        recipe_stage=config.recipe_stage,
        recipe_args=config.recipe_args,
        tokenizer=tokenizer,
        trainer_kwargs=_trainer_kwargs(parser, config),
        propagate_compressed=config.propagate_compressed,
        staged=config.staged,
        moe_calibrate_all_experts=config.moe_calibrate_all_experts,
        overwrite_output_dir=config.overwrite_output_dir,
        text_column=config.text_column,
        concatenate_data=config.concatenate_data,
        summary=summary,
        strict=config.strict,
    )
    model = compressed
    if evaluation is not None:
        with summary.phase("evaluate"):
            after = perplexity(model, evaluation)
    if rank_and_world_size()[0] != 0:
        return model
    if after is not None:
        summary.set_quality(f"perplexity on {label}", before, after)
    summary.log()
    if config.output_dir is not None:
        print(f"Saved the compressed model to {config.output_dir} (compressed-tensors format)")
    if after is not None:
        print(f"Perplexity on {label}: {before:.3f} before compression, {after:.3f} after")
    return model


def _check_output_dir(parser: ArgumentParser, config: Namespace) -> None:
    """Refuses a non-empty ``--output_dir`` before anything is loaded, naming the flag."""
    output_dir = config.output_dir
    if output_dir is None or config.overwrite_output_dir:
        return
    path = Path(output_dir)
    if path.is_dir() and any(path.iterdir()):
        parser.error(
            f"--output_dir {output_dir!r} exists and is not empty; choose another directory "
            f"or add --overwrite_output_dir to replace it"
        )


def _out_of_core(config: Namespace) -> bool:
    """Whether ``--out_of_core`` (True, False or auto) reads ``--model`` block by block
    (``choose_out_of_core``); auto is False for a model that is not a directory."""
    if not isinstance(config.model, str):
        return config.out_of_core is True
    blockers = {
        "no --output_dir is given": config.output_dir is None,
        "--dtype casts it": config.dtype is not None,
        "--eval_dataset evaluates it in memory": config.eval_dataset is not None,
        "--pipeline basic calibrates the whole model at once": config.pipeline == "basic",
    }
    return choose_out_of_core(
        config.out_of_core, config.model, [blocker for blocker, given in blockers.items() if given]
    )


def _checkpoint_source(parser: ArgumentParser, config: Namespace) -> tuple[CheckpointSource, Any]:
    """The empty model of ``--out_of_core`` and its tokenizer; usage errors name the flags
    it cannot take."""
    if not isinstance(config.model, str):
        parser.error("--out_of_core: expected --model PATH, a transformers checkpoint directory")
    conflicts = {
        "--output_dir": config.output_dir is None,
        "--dtype (the stored dtype is kept)": config.dtype is not None,
        "--eval_dataset (the weights are not in memory)": config.eval_dataset is not None,
    }
    if conflicts.pop("--output_dir"):
        parser.error("--out_of_core: needs --output_dir, where each compressed block is written")
    refused = [flag for flag, given in conflicts.items() if given]
    if refused:
        parser.error(f"--out_of_core: cannot be combined with {', '.join(refused)}")
    try:
        source = CheckpointSource(config.model)
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"--model: {error}")
    from transformers import AutoTokenizer

    tokenizer_dir = config.tokenizer if config.tokenizer is not None else config.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, TypeError) as error:
        parser.error(f"--tokenizer: none could be loaded from {tokenizer_dir!r} ({error})")
    return source, tokenizer


def _model(parser: ArgumentParser, config: Namespace) -> tuple[nn.Module, Any]:
    """The model and tokenizer that ``--model``, ``--dtype`` and ``--tokenizer`` name."""
    if not isinstance(config.model, dict):
        return load_pretrained(config.model, config.dtype, config.tokenizer, False)
    module = _module(parser, config.model)
    model = language_model(module)
    dtype = torch_dtype(config.dtype)
    if dtype is not None:
        model = model.to(dtype)
    if config.tokenizer is not None:
        from transformers import AutoTokenizer

        return model, AutoTokenizer.from_pretrained(config.tokenizer)
    tokenizer = getattr(module, "tokenizer", None)  # a CausalLMModule may hold one
    if tokenizer is None and isinstance(model, TinyDecoder):
        tokenizer = load_tokenizer()
    return model, tokenizer


def _module(parser: ArgumentParser, spec: dict) -> nn.Module:
    """The module a ``{class_path, init_args}`` mapping describes; a usage error otherwise."""
    if "class_path" not in spec:
        parser.error(
            f"--model: got the keys {sorted(spec)}; expected a checkpoint directory "
            f"(--model PATH) or, in a YAML config, a module as {{class_path, init_args}}"
        )
    modules = ArgumentParser(exit_on_error=False)
    modules.add_subclass_arguments(nn.Module, "model")
    try:
        return modules.instantiate(modules.parse_object({"model": spec})).model
    except ArgumentError as error:
        parser.error(f"--model: {spec['class_path']} cannot be built: {error}")


def _evaluation(
    config: Namespace, model: nn.Module, tokenizer: Any
) -> tuple[list[Sample] | None, str]:
    """The evaluation windows and how to name them; the bundled text for the bundled model."""
    if config.eval_dataset is not None:
        samples = evaluation_samples(
            config.eval_dataset,
            tokenizer,
            model,
            config.max_seq_length,
            config.eval_samples,
            config.text_column,
        )
        return (
            samples,
            f"{len(samples)} windows of {config.max_seq_length} tokens of {config.eval_dataset}",
        )
    if not isinstance(model, TinyDecoder):
        return None, ""
    seq_len = min(BUNDLED_EVALUATION_SEQ_LEN, model.config.max_seq_len)
    samples = evaluation_samples(None, tokenizer, model, seq_len, config.eval_samples)
    return samples, f"{len(samples)} windows of the bundled evaluation text"


def _trainer_kwargs(parser: ArgumentParser, config: Namespace) -> dict[str, Any]:
    """The Trainer options given (others keep ``oneshot``'s quiet defaults)."""
    defaults = parser.get_defaults().trainer
    given = {key for key, value in config.trainer.items() if value != defaults.get(key)}
    trainer = parser.instantiate(config).trainer
    return {key: trainer[key] for key in given}


def _names(value: str | list[str] | None) -> list[str] | None:
    """A comma-separated string as a list; a list or None as it is."""
    return value.split(",") if isinstance(value, str) else value
