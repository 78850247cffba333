"""llm-compressor's ``oneshot`` keywords, read with the same meaning or refused with the reason.

``oneshot`` takes every keyword argument of llm-compressor's ``oneshot`` (0.14). Those it shares
(``model``, ``dataset``, ``recipe``, ``num_calibration_samples``, ...) also take llm-compressor's
values: a model or tokenizer as a local checkpoint directory (or a Hugging Face cache entry),
``recipe_args`` as ``["key=value"]``, ``pipeline="datafree"``/``"independent"``,
``max_seq_length=None``, a ``DatasetDict``. The others are listed in :data:`KEYWORDS`: each
either maps onto a setting of ours, is accepted at the value that means what happens here anyway,
has no effect here (a speed setting; a warning says so), is deprecated (a warning says what to
write), or is refused with an error naming it and what to do instead. Nothing is downloaded: a
hub name that is not in the local cache is refused.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from loguru import logger
from torch import nn

from lightning_compress.lightning.out_of_core_choice import choose_out_of_core
from lightning_compress.modifiers.tied_weights import untie_weights
from lightning_compress.pipelines.calibration_data import calibration_samples
from lightning_compress.pipelines.checkpoint_source import CheckpointSource
from lightning_compress.pretrained import load_model
from lightning_compress.recipe.errors import did_you_mean

__all__ = ["KEYWORDS", "PIPELINE_NAMES", "PRECISIONS", "accepts_llmcompressor_keywords"]

PIPELINE_NAMES: dict[str | None, str] = {
    None: "auto",
    "datafree": "data_free",
    "independent": "auto",
}
"""llm-compressor's pipeline names that differ from ours, and ours for them."""
PRECISIONS: dict[str, str | None] = {
    "auto": None,
    "half": "float16",
    "float16": "float16",
    "torch.float16": "float16",
    "bfloat16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "full": "float32",
    "float32": "float32",
    "torch.float32": "float32",
}
"""llm-compressor's ``precision`` values, and the dtype each loads the model in (None: its own)."""
SHUFFLE_SEED = 0
HUB = "nothing is downloaded here"
_SPLIT = re.compile(r"^(?P<name>[\w.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$")


@dataclass
class _Call:
    """One ``oneshot`` call being translated: our arguments and the keywords kept for later."""

    arguments: dict[str, Any]
    given: set[str]
    options: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the checkpoint directory the model came from

    def set(self, target: str, value: Any, keyword: str) -> None:
        """Sets our argument ``target`` from llm-compressor's ``keyword``, unless both are given."""
        if target in self.given:
            raise ValueError(f"pass {keyword} or {target}, not both (they mean the same)")
        self.arguments[target] = value
        self.given.add(target)


Handler = Callable[[_Call, str, Any], None]


def _ours(target: str) -> Handler:
    """A keyword that is our argument ``target`` under another name."""

    def handle(call: _Call, keyword: str, value: Any) -> None:
        call.set(target, value, keyword)

    return handle


def _kept(call: _Call, keyword: str, value: Any) -> None:
    """A keyword read by a later step of the translation."""
    call.options[keyword] = value


def _only(accepted: tuple[Any, ...], instead: str) -> Handler:
    """A keyword whose ``accepted`` values mean what happens here anyway; others are refused."""

    def handle(call: _Call, keyword: str, value: Any) -> None:
        if not any(value is option or value == option for option in accepted):
            raise ValueError(f"{keyword}={value!r} is not supported: {instead}")

    return handle


def _no_effect(default: Any, why: str) -> Handler:
    """A keyword that changes nothing here (speed, caching); other values than ``default`` warn."""

    def handle(call: _Call, keyword: str, value: Any) -> None:
        if value != default:
            logger.warning(f"{keyword}={value!r} has no effect here: {why}")

    return handle


def _deprecated(instead: str) -> Handler:
    """A keyword llm-compressor deprecates; it is accepted with a warning saying what to write."""

    def handle(call: _Call, keyword: str, value: Any) -> None:
        logger.warning(f"{keyword} is deprecated (in llm-compressor too): {instead}")

    return handle


def _stage(call: _Call, keyword: str, value: Any) -> None:
    """``stage``: the recipe stage to run; the checkpoint goes to ``output_dir/<stage>``."""
    if value is not None:
        call.set("recipe_stage", value, keyword)
        call.options[keyword] = value


def _data_collator(call: _Call, keyword: str, value: Any) -> None:
    """``data_collator``: batches are padded to their longest sample here ("padding")."""
    batch_size = call.arguments["batch_size"]
    if value == "padding" or (value == "truncation" and batch_size == 1):
        return
    raise ValueError(
        f"{keyword}={value!r} is not supported: batches are padded to their longest sample, "
        f"with an attention mask (data_collator='padding'); for another collation pass a "
        f"DataLoader with your collate_fn as dataset"
    )


_LOAD_FROM_PATH = "applies to a model given as a path"
KEYWORDS: dict[str, Handler] = {
    # the model
    "processor": _ours("tokenizer"),
    "precision": _kept,
    "model_revision": _kept,
    "tie_word_embeddings": _kept,
    "config_name": _only(
        (None,),
        "the config is the model directory's config.json; edit it, or load the model "
        "yourself and pass the module",
    ),
    "trust_remote_code_model": _only(
        (False,),
        "load a model with its own modeling code yourself, with "
        "from_pretrained(path, trust_remote_code=True), and pass the module",
    ),
    "save_compressed": _only(
        (True,),
        "output_dir always gets a compressed-tensors checkpoint; "
        "transformers' from_pretrained reads it back dense",
    ),
    # the recipe
    "stage": _stage,
    "clear_sparse_session": _no_effect(
        True, "each oneshot call runs its own session; nothing is kept in active_session()"
    ),
    # the data
    "dataset_path": _ours("dataset"),
    "splits": _kept,
    "preprocessing_func": _kept,
    "shuffle_calibration_samples": _kept,
    "data_collator": _data_collator,
    "remove_columns": _deprecated(
        "remove it: only the text, messages or input_ids columns are read"
    ),
    "dataset_config_name": _only(
        (None,),
        f"it names a configuration of a hub dataset and {HUB}: pass a "
        "datasets.Dataset or a local data file as dataset",
    ),
    "dvc_data_repository": _only((None,), f"{HUB}: pass a local data file as dataset"),
    "raw_kwargs": _only(({}, None), f"they go to datasets.load_dataset and {HUB}"),
    "streaming": _only(
        (False, None), f"it streams a hub dataset and {HUB}: pass a local data file"
    ),
    "pad_to_max_length": _only(
        (False,), "batches are padded to their longest sample, with an attention mask"
    ),
    "overwrite_cache": _no_effect(False, "nothing is cached; the data is read on every call"),
    "preprocessing_num_workers": _no_effect(None, "the data is tokenized in this process"),
    "dataloader_num_workers": _no_effect(
        0, "the samples are tokenized before the calibration and held in memory"
    ),
    # the pipeline
    "propagate_error": _ours("propagate_compressed"),
    "sequential_offload_device": _only(
        ("cpu",),
        "the activations between blocks are kept in CPU memory, or on disk with offload_dir=DIR",
    ),
    "sequential_targets_per_subgraph": _only(
        (1,), "each block named by sequential_targets is calibrated on its own"
    ),
    "sequential_prefetch": _no_effect(
        False, "each block's inputs are moved to its device when it runs"
    ),
    "tracing_ignore": _kept,
    "quantization_aware_calibration": _deprecated(
        "remove it: each block is calibrated on the compressed previous blocks' outputs "
        "(propagate_compressed=True)"
    ),
    "min_tokens_per_module": _only(
        (None,),
        "a layer that receives no calibration token falls back to its data-free "
        "method, with a warning naming it",
    ),
    "use_loss_mask": _only(
        (False,), "every token of a sample counts; leave out the tokens that should not"
    ),
    # the run
    "log_dir": _kept,
}
"""llm-compressor's ``oneshot`` keywords that are not ``oneshot``'s own, with how each is read."""


def accepts_llmcompressor_keywords(function: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Lets ``function`` (``oneshot``) take llm-compressor's keyword arguments and values.

    Args:
        function: a function whose parameters include ``oneshot``'s.

    Returns:
        The function, taking also the keywords of :data:`KEYWORDS`.

    Raises:
        TypeError: (from the returned function) for a keyword neither takes.
    """
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> nn.Module:
        own = {name: value for name, value in kwargs.items() if name in signature.parameters}
        unknown = sorted(set(kwargs) - set(own) - set(KEYWORDS))
        if unknown:
            hint = did_you_mean(unknown, [*signature.parameters, *KEYWORDS])
            raise TypeError(f"oneshot() got unexpected keyword argument(s) {unknown}{hint}")
        bound = signature.bind(*args, **own)
        call = _Call(dict(bound.arguments), set(bound.arguments))
        bound.apply_defaults()
        call.arguments = dict(bound.arguments)
        for keyword, value in kwargs.items():
            if keyword not in own:
                KEYWORDS[keyword](call, keyword, value)
        _translate(call)
        with _log_file(call.options.get("log_dir")):
            return function(**call.arguments)

    wrapper.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            *signature.parameters.values(),
            inspect.Parameter("llmcompressor_keywords", inspect.Parameter.VAR_KEYWORD),
        ]
    )
    return wrapper


def _translate(call: _Call) -> None:
    """Our arguments from llm-compressor's: the model, tokenizer, data and settings."""
    arguments, options = call.arguments, call.options
    _model(call)
    _tokenizer(call)
    _tracing_ignore(options)
    pipeline = arguments["pipeline"]
    if pipeline in PIPELINE_NAMES:
        if pipeline == "independent":
            logger.info(
                "pipeline='independent': the modifiers of a recipe stage calibrate in one pass "
                "here, block by block (the stages one after another)"
            )
        arguments["pipeline"] = PIPELINE_NAMES[pipeline]
        if pipeline == "datafree" and arguments["dataset"] is not None:
            logger.warning("pipeline='datafree' reads no calibration data: the dataset is not read")
            arguments["dataset"] = None
    if isinstance(arguments["recipe_args"], list | tuple):
        arguments["recipe_args"] = _recipe_args(arguments["recipe_args"])
    if arguments["max_seq_length"] is None:
        arguments["max_seq_length"] = _model_context(_module(arguments["model"]))
    if "stage" in options and arguments["output_dir"] is not None:
        arguments["output_dir"] = Path(arguments["output_dir"]) / str(options["stage"])
        logger.info(f"stage={options['stage']!r}: the checkpoint goes to {arguments['output_dir']}")
    _data(call)


# ---------------------------------------------------------------- the model and tokenizer
def _model(call: _Call) -> None:
    """Loads a model given as a path; applies ``precision``, ``model_revision``, untying."""
    model, options = call.arguments["model"], call.options
    precision = str(options.get("precision", "auto"))
    revision = options.get("model_revision", "main")
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {list(PRECISIONS)}, got {precision!r}")
    if isinstance(model, str | os.PathLike):
        call.source = _checkpoint(model, revision, "model")
        call.arguments["out_of_core"] = choose_out_of_core(
            call.arguments["out_of_core"], call.source, _in_memory_only(call.arguments, precision)
        )
    if isinstance(model, str | os.PathLike) and call.arguments["out_of_core"]:
        if precision != "auto":
            raise ValueError(
                f"precision={precision!r}: out_of_core keeps the checkpoint's dtype (each block "
                f"is read as it is stored); leave precision='auto'"
            )
        source = CheckpointSource(call.source)
        call.arguments["model"], model = source, source.model
    elif isinstance(model, str | os.PathLike):
        call.arguments["model"] = model = load_model(
            call.source, PRECISIONS[precision], keep_quantization=False
        )
    else:
        for keyword, default in (("precision", "auto"), ("model_revision", "main")):
            if options.get(keyword, default) != default:
                raise ValueError(
                    f"{keyword}: {_LOAD_FROM_PATH}; the model is a module already (cast it with "
                    f"model.to(dtype), or pass the checkpoint's directory as model)"
                )
        call.source = _cached(getattr(getattr(model, "config", None), "_name_or_path", None))
    if options.get("tie_word_embeddings", True) is False and isinstance(model, nn.Module):
        _untie_output_embeddings(model)


def _in_memory_only(arguments: Mapping[str, Any], precision: str) -> list[str]:
    """What makes a run compress a checkpoint in memory (see ``choose_out_of_core``)."""
    blockers = [] if arguments["output_dir"] is not None else ["no output_dir is given"]
    if precision != "auto":
        blockers.append(f"precision={precision!r} casts it")
    if arguments["pipeline"] == "basic":
        blockers.append("pipeline='basic' calibrates the whole model at once")
    return blockers


def _module(model: Any) -> Any:
    """The model as a module (a model read from its checkpoint: its empty module)."""
    return model.model if isinstance(model, CheckpointSource) else model


def _checkpoint(source: str | os.PathLike, revision: str, keyword: str) -> Path:
    """A local checkpoint directory, or ``source``'s snapshot in the Hugging Face cache.

    Raises:
        ValueError: for a revision of a local directory, or a name that is not cached.
    """
    path = Path(source).expanduser()
    if path.exists():
        if revision != "main":
            raise ValueError(
                f"model_revision={revision!r}: revisions are of hub repositories and {path} is "
                f"a local directory; pass the directory of that revision"
            )
        return path
    cached = _cached(str(source), revision)
    if cached is None:
        raise ValueError(
            f"{keyword}: {str(source)!r} is no local directory and not in the Hugging Face "
            f"cache; {HUB}: download it first (hf download {source} --local-dir DIR) and pass "
            f"DIR"
        )
    return cached


def _cached(source: str | None, revision: str = "main") -> Path | None:
    """``source`` as a local directory or a snapshot of the Hugging Face cache; None if neither."""
    if not source:
        return None
    if Path(source).expanduser().is_dir():
        return Path(source).expanduser()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, local_files_only=True))
    except (ImportError, OSError, ValueError):
        return None


def _tokenizer(call: _Call) -> None:
    """A tokenizer given as a path is loaded; none given: the model directory's, if it has one.

    llm-compressor loads the processor from the model's directory when none is given; here
    that happens when it is needed (calibration data or ``output_dir``) and possible.
    """
    arguments = call.arguments
    tokenizer = arguments["tokenizer"]
    if isinstance(tokenizer, str | os.PathLike):
        directory = _checkpoint(tokenizer, call.options.get("model_revision", "main"), "tokenizer")
        arguments["tokenizer"] = _load_tokenizer(directory, strict=True)
    elif tokenizer is None and call.source is not None and _needs_tokenizer(arguments):
        arguments["tokenizer"] = _load_tokenizer(call.source, strict=False)


def _needs_tokenizer(arguments: Mapping[str, Any]) -> bool:
    """Whether the call reads data (which may be text) or saves a checkpoint."""
    return arguments["dataset"] is not None or arguments["output_dir"] is not None


def _load_tokenizer(directory: Path, strict: bool) -> Any | None:
    """``AutoTokenizer.from_pretrained(directory)``; without ``strict``, None where it has none.

    Raises:
        ValueError: with ``strict``, when ``directory`` holds no tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        if strict:
            raise ValueError(f"tokenizer: no tokenizer in {str(directory)!r} ({error})") from error
        logger.warning(
            f"no tokenizer could be loaded from {str(directory)!r}: the checkpoint is saved "
            f"without one and text data is refused; pass tokenizer= to use one"
        )
        return None


def _untie_output_embeddings(model: nn.Module) -> None:
    """``tie_word_embeddings=False``: the output embedding gets its own copy of the weight.

    Raises:
        ValueError: for a model without output embeddings.
    """
    output = getattr(model, "get_output_embeddings", lambda: None)()
    if output is None:
        raise ValueError(
            f"tie_word_embeddings=False: {type(model).__name__} has no output embeddings to untie"
        )
    name = next(name for name, module in model.named_modules() if module is output)
    untie_weights("oneshot", model, {name: output})


def _tracing_ignore(options: Mapping[str, Any]) -> None:
    """``tracing_ignore``: the sequential pipeline here runs the model's blocks untraced."""
    if options.get("tracing_ignore") is not None:
        logger.warning(
            "tracing_ignore has no effect here: the sequential pipeline runs the model's own "
            "blocks, without tracing the model"
        )


def _model_context(model: Any) -> int:
    """``max_seq_length=None``: the model's ``config.max_position_embeddings``.

    Raises:
        ValueError: where the model does not say it.
    """
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        raise ValueError(
            "max_seq_length=None: the model's config has no max_position_embeddings to take "
            "instead; give max_seq_length"
        )
    return positions


def _recipe_args(values: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["key=value", ...]`` as a mapping.

    Raises:
        ValueError: for an entry without ``=``.
    """
    pairs = {}
    for value in values:
        key, sign, text = str(value).partition("=")
        if not sign or not key:
            raise ValueError(f"recipe_args: expected 'key=value' entries, got {value!r}")
        pairs[key] = text
    return pairs


# ---------------------------------------------------------------- the data
def _data(call: _Call) -> None:
    """Applies ``splits``, ``preprocessing_func`` and ``shuffle_calibration_samples``."""
    arguments, options = call.arguments, call.options
    split = _split_name(options.get("splits"))
    dataset = arguments["dataset"]
    if _is_dataset_dict(dataset):
        dataset = _split_of(dataset, split)
    elif split is not None:
        dataset = _slice_of(dataset, split)
    if options.get("preprocessing_func") is not None:
        dataset = _preprocessed(dataset, options["preprocessing_func"])
    arguments["dataset"] = dataset
    if options.get("shuffle_calibration_samples") and dataset is not None:
        _draw_samples(arguments)


def _split_name(splits: Any) -> str | None:
    """llm-compressor's ``splits``: a split string; a list or ``{"calibration": ...}`` warn.

    Raises:
        ValueError: for a mapping without ``calibration``, or another type.
    """
    if splits is None or isinstance(splits, str):
        return splits
    if isinstance(splits, Mapping) and "calibration" in splits:
        logger.warning(
            f"splits as a mapping is deprecated (in llm-compressor too): write "
            f"splits={splits['calibration']!r}"
        )
        return splits["calibration"]
    if isinstance(splits, list | tuple) and splits:
        logger.warning(f"splits as a list is deprecated: write splits={splits[0]!r}")
        return splits[0]
    raise ValueError(f"splits: expected a split such as 'train' or 'train[:50%]', got {splits!r}")


def _is_dataset_dict(dataset: Any) -> bool:
    datasets = sys.modules.get("datasets")  # a DatasetDict exists only once it is imported
    return datasets is not None and isinstance(dataset, datasets.DatasetDict)


def _split_of(dataset: Any, split: str | None) -> Any:
    """The split ``split`` names of a ``DatasetDict`` (``train`` when none is named).

    Raises:
        ValueError: for a split the dataset does not have.
    """
    if split is None:
        if "train" not in dataset:
            raise ValueError(
                f"splits: the dataset has the splits {list(dataset)} and none is 'train'; "
                f"name one (splits='{next(iter(dataset), 'train')}')"
            )
        logger.warning("no splits given: calibrating on the dataset's 'train' split")
        split = "train"
    name = _parse_split(split)[0]
    if name not in dataset:
        raise ValueError(f"splits: {name!r} is no split of the dataset; it has {list(dataset)}")
    return _slice_of(dataset[name], split)


def _slice_of(dataset: Any, split: str) -> Any:
    """The records of a ``datasets.Dataset`` that ``split`` (``name[start:stop]``) selects.

    Raises:
        ValueError: for data that is no ``datasets.Dataset``, or another split's name.
    """
    if not (hasattr(dataset, "column_names") and hasattr(dataset, "select")):
        raise ValueError(
            f"splits={split!r}: splits select records of a datasets.Dataset or DatasetDict; "
            f"dataset is a {type(dataset).__name__}: pass the records to calibrate on"
        )
    name, start, stop = _parse_split(split)
    own = str(dataset.split) if getattr(dataset, "split", None) is not None else name
    if name != own:
        raise ValueError(f"splits={split!r}: the dataset is the {own!r} split, not {name!r}")
    indices = range(len(dataset))[_position(start, len(dataset)) : _position(stop, len(dataset))]
    return dataset if len(indices) == len(dataset) else dataset.select(indices)


def _parse_split(split: str) -> tuple[str, str | None, str | None]:
    """``"train[10%:50%]"`` as ``("train", "10%", "50%")``.

    Raises:
        ValueError: for another form.
    """
    match = _SPLIT.match(split.strip())
    if match is None:
        raise ValueError(
            f"splits: expected 'name' or 'name[start:stop]' (counts or percentages), got {split!r}"
        )
    return match["name"], match["start"], match["stop"]


def _position(bound: str | None, length: int) -> int | None:
    """A slice bound of a split: a count, or a percentage of ``length`` rounded to the nearest."""
    if bound is None:
        return None
    if bound.endswith("%"):
        return round(length * int(bound[:-1]) / 100)
    return int(bound)


def _preprocessed(dataset: Any, function: Any) -> Any:
    """``preprocessing_func`` applied to each record (``datasets.Dataset.map``).

    Raises:
        ValueError: for a function given by name, or data whose records cannot be mapped.
    """
    if not callable(function):
        raise ValueError(
            f"preprocessing_func: expected a function, got {function!r}; import it and pass it"
        )
    if hasattr(dataset, "column_names") and hasattr(dataset, "map"):
        return dataset.map(function)
    if isinstance(dataset, list) and all(isinstance(record, Mapping) for record in dataset):
        return [function(record) for record in dataset]
    raise ValueError(
        f"preprocessing_func: it maps the records of a datasets.Dataset or a list of dicts; "
        f"dataset is a {type(dataset).__name__}"
    )


def _draw_samples(arguments: dict[str, Any]) -> None:
    """``shuffle_calibration_samples=True``: ``num_calibration_samples`` samples drawn at random.

    All samples are read (as ``oneshot`` reads them) and the draw, seeded, is the same on every
    run and every process.
    """
    samples = calibration_samples(
        arguments["dataset"],
        None,
        arguments["max_seq_length"],
        arguments["tokenizer"],
        _module(arguments["model"]),
        text_column=arguments["text_column"],
        concatenate_data=arguments["concatenate_data"],
    )
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    count = arguments["num_calibration_samples"]
    arguments["dataset"] = [samples[index] for index in order[:count].tolist()]
    arguments["concatenate_data"] = None  # the samples are read already


@contextmanager
def _log_file(log_dir: str | os.PathLike | None) -> Iterator[None]:
    """``log_dir``: the run's log, from DEBUG up, in ``log_dir/oneshot_<date>.log``."""
    if log_dir is None:
        yield
        return
    os.makedirs(log_dir, exist_ok=True)
    path = Path(log_dir) / f"oneshot_{datetime.now():%Y-%m-%d_%H-%M-%S}.log"
    sink = logger.add(str(path), level="DEBUG")
    try:
        yield
    finally:
        logger.remove(sink)
