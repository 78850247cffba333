"""Checks of a checkpoint against its ``quantization_config``, before anything is loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compressed_tensors.base import QUANTIZATION_METHOD, QUANTIZATION_METHOD_NAME
from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from pydantic import ValidationError
from torch import Tensor, nn

from lightning_compress.export.attention import is_attention_group
from lightning_compress.export.errors import ExportError
from lightning_compress.export.layout import differences, layout_of, written_layout
from lightning_compress.export.storage_format import storage_format

__all__ = ["check_layer", "check_state", "read_quantization_config"]

FIELD = "quantization_config"
PACKED_FORMATS = {CompressionFormat.pack_quantized.value}
"""Formats whose codes are packed into int32 words (so always within their bit width)."""


def read_quantization_config(config: dict[str, Any], file: Path) -> QuantizationConfig | None:
    """Takes the ``quantization_config`` out of ``config`` and checks it.

    Args:
        config: the content of ``config.json``; its ``quantization_config`` is removed.
        file: ``config.json``, for error messages.

    Returns:
        The quantization config, or None when the checkpoint quantizes nothing (absent, or
        only a sparsity config).

    Raises:
        ExportError: when the entry is not a compressed-tensors quantization config, a field
            is invalid, or a config group's format does not store its scheme.
    """
    entry = config.pop(FIELD, None)
    if entry is None:
        return None
    if not isinstance(entry, dict):
        raise ExportError(
            f"{file}: {FIELD} must be an object with quant_method '{QUANTIZATION_METHOD}', got "
            f"{type(entry).__name__} {entry!r}"
        )
    method = entry.get(QUANTIZATION_METHOD_NAME)
    if method != QUANTIZATION_METHOD:
        raise ExportError(
            f"{file}: {FIELD}.{QUANTIZATION_METHOD_NAME} is {method!r}; load_compressed reads "
            f"'{QUANTIZATION_METHOD}' checkpoints only"
        )
    if not entry.get("config_groups") and not entry.get("kv_cache_scheme"):
        return None
    try:
        quantization = QuantizationConfig.model_validate(entry)
    except ValidationError as err:
        raise ExportError(f"{file}: {_validation_problems(err)}") from err
    for group, scheme in quantization.config_groups.items():
        if is_attention_group(scheme):  # no weights: nothing stored in a format
            continue
        where = f"{file}: {FIELD}.config_groups.{group}"
        _check_format(scheme, scheme.format or quantization.format, where)
    return quantization


def check_layer(
    name: str, module: nn.Module, scheme: CTQuantizationScheme, stored: dict[str, Tensor], file: str
) -> None:
    """Checks that a layer's stored tensors are what its scheme and format describe.

    The names, shapes and dtypes must be those compressed-tensors writes for the layer's
    shape; ``weight_shape`` must hold that shape; unpacked integer codes and zero points must
    lie in the range of ``num_bits``.

    Args:
        name: the layer's name.
        module: the layer, as the model's config builds it.
        scheme: the scheme of its config group, with ``format`` set.
        stored: its tensors in the checkpoint, by local name.
        file: the file(s) they were read from.

    Raises:
        ExportError: naming the layer, the file and what differs.
    """
    where = f"{file}: layer '{name}' ({_describe(scheme)}, format {scheme.format})"
    weight = module.weight
    try:
        expected = written_layout(
            tuple(weight.shape), getattr(module, "bias", None) is not None, weight.dtype, scheme
        )
    except (ValueError, RuntimeError, AssertionError) as err:
        raise ExportError(f"{where}: the scheme does not fit the layer: {err}") from err
    gaps = differences(layout_of(stored), expected)
    if gaps:
        raise ExportError(
            f"{where} does not match its quantization_config: {'; '.join(gaps)}; the config or "
            "the file was changed after saving"
        )
    if "weight_shape" in stored and stored["weight_shape"].tolist() != list(weight.shape):
        raise ExportError(
            f"{where}: weight_shape is {stored['weight_shape'].tolist()}, expected "
            f"{list(weight.shape)}"
        )
    if scheme.format not in PACKED_FORMATS:
        _check_code_range(where, stored, scheme)


def check_state(
    found: dict[str, Tensor], expected: dict[str, Tensor], files: dict[str, Path]
) -> None:
    """Checks the shapes and dtypes of the tensors loaded as they are (not quantized ones).

    Args:
        found: checkpoint tensors by name.
        expected: the model's tensors by name.
        files: the file each checkpoint tensor came from.

    Raises:
        ExportError: naming the tensors, their files and what differs.
    """
    common = found.keys() & expected.keys()
    gaps = differences(
        layout_of({key: found[key] for key in common}),
        layout_of({key: expected[key] for key in common}),
    )
    if gaps:
        culprits = sorted({str(files.get(gap.split(" ", 1)[0], "the checkpoint")) for gap in gaps})
        raise ExportError(f"{', '.join(culprits)}: {'; '.join(gaps)}")


def _validation_problems(err: ValidationError) -> str:
    """Each invalid field by its path in ``config.json`` (the deepest error of each branch)."""
    problems = {}
    for error in err.errors():
        # pydantic tags the members of a union ("list[str]", "function-after[...]")
        parts = [str(part) for part in error["loc"] if "[" not in str(part)]
        problems.setdefault(".".join((FIELD, *parts)), error["msg"])
    deepest = [
        path for path in problems if not any(other.startswith(f"{path}.") for other in problems)
    ]
    return "; ".join(f"{path}: {problems[path]}" for path in deepest)


def _check_format(scheme: CTQuantizationScheme, stored_as: str | None, where: str) -> None:
    """A group's format must be one compressed-tensors writes for its scheme: e.g.
    ``int-quantized`` is the format of schemes with quantized input activations."""
    formats = BaseCompressor.registered_names()
    if stored_as not in formats:
        raise ExportError(
            f"{where}: format {stored_as!r} is not one layers are stored in; expected one of "
            f"{formats}"
        )
    written = storage_format(nn.Linear, scheme)
    compressor = BaseCompressor.get_value_from_registry(stored_as)
    if stored_as != written and not compressor.can_compress(nn.Linear, scheme):
        raise ExportError(
            f"{where}: format {stored_as!r} does not store the group's scheme "
            f"({_describe(scheme)}; compressed-tensors writes it as {written!r}): a field was "
            "changed or dropped after saving (e.g. input_activations), so the checkpoint "
            "would load as another scheme than it was saved with; restore the config"
        )


def _check_code_range(where: str, stored: dict[str, Tensor], scheme: CTQuantizationScheme) -> None:
    weights = scheme.weights
    if weights.type != "int":
        return
    low, high = -(2 ** (weights.num_bits - 1)), 2 ** (weights.num_bits - 1) - 1
    for key in ("weight", "weight_zero_point"):
        codes = stored.get(key)
        if codes is None or codes.is_floating_point() or not codes.numel():
            continue
        if int(codes.min()) < low or int(codes.max()) > high:
            raise ExportError(
                f"{where}: {key} holds codes in [{int(codes.min())}, {int(codes.max())}], "
                f"outside [{low}, {high}] of num_bits={weights.num_bits}; the config or the "
                "file was changed after saving"
            )


def _describe(scheme: CTQuantizationScheme) -> str:
    roles = {
        role: getattr(scheme, role)
        for role in ("weights", "input_activations")
        if getattr(scheme, role) is not None
    }
    parts = [
        f"{role} {args.type}{args.num_bits} {args.strategy}"
        + (f" group_size={args.group_size}" if args.group_size else "")
        + ("" if args.symmetric else " asymmetric")
        for role, args in roles.items()
    ]
    parts.append("input_activations null" if scheme.input_activations is None else "")
    return ", ".join(part for part in parts if part)
