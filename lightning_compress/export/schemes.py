"""The quantized layers of a model, and their schemes in compressed-tensors terms.

After one-shot quantization or quantization-aware training every quantized layer holds a
``quantization_scheme`` (:class:`~lightning_compress.modifiers.quantization.QuantizationScheme`)
and its qparam buffers, so the scheme of each layer is read from the layer itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import compressed_tensors
import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationArgs as CTQuantizationArgs
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from loguru import logger
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import parametrize

from lightning_compress.export.errors import ExportError
from lightning_compress.export.layout import (
    asymmetric_int_weights,
    differences,
    prepared_layout,
    written_layout,
)
from lightning_compress.export.storage_format import storage_format
from lightning_compress.modifiers.pruning import MASK_BUFFER
from lightning_compress.modifiers.quantization import QuantizationArgs, QuantizationScheme
from lightning_compress.modifiers.quantization.formats import format_of
from lightning_compress.modifiers.quantization.fused import fused_groups
from lightning_compress.modifiers.quantization.qat import OBSERVER_BUFFERS

__all__ = [
    "check_finished",
    "from_ct_scheme",
    "named_modules_within",
    "quantized_layers",
    "to_ct_scheme",
]

ROLES = ("weights", "input_activations", "output_activations")
TRAINING_BUFFERS = (MASK_BUFFER, *OBSERVER_BUFFERS)
FALLBACK_FORMAT = CompressionFormat.naive_quantized.value
"""The format a layer is stored in when transformers cannot load the one compressed-tensors
picks. compressed-tensors 0.20.1 writes asymmetric ``pack-quantized`` zero points packed
along the output dimension (``[out * num_bits / 32, groups]`` int32), but the meta-device
branch of ``PackedQuantizationCompressor.compress``
(``compressed_tensors/compressors/pack_quantized/base.py``), which transformers'
``from_pretrained`` runs to prepare the model, leaves them unpacked (``[out, groups]``
int8): such checkpoints, llm-compressor's included, do not load. ``naive-quantized`` stores
one int8 code per weight and the zero points as they are, which it loads."""


def check_finished(model: nn.Module, within: Sequence[str] | None = None) -> None:
    """Refuses a model whose compression is still under way.

    Args:
        model: the model to save.
        within: names of submodules of ``model`` to check (as :func:`quantized_layers`); None
            checks the whole model.

    Raises:
        ExportError: when a layer's weight is still parametrized (quantization-aware training
            not finalized) or a layer still holds pruning masks or observer statistics.
    """
    for name, module in named_modules_within(model, within):
        leftovers = [buffer for buffer in TRAINING_BUFFERS if buffer in module._buffers]
        if parametrize.is_parametrized(module) or leftovers:
            what = leftovers or ["a weight parametrization"]
            raise ExportError(
                f"layer '{name}' still holds {what}: its compression is not finished; "
                "finalize the session (trainer.fit ends it, or session.finalize()) before saving"
            )


def quantized_layers(
    model: nn.Module, pack_asymmetric: bool = False, within: Sequence[str] | None = None
) -> dict[str, tuple[nn.Module, CTQuantizationScheme]]:
    """The quantized layers of ``model``, each with its compressed-tensors scheme.

    Args:
        model: the model.
        pack_asymmetric: store asymmetric int weights in the format compressed-tensors picks
            (``pack-quantized``, what vLLM serves) even where the installed transformers
            cannot load it, instead of :data:`FALLBACK_FORMAT`.
        within: names of submodules of ``model`` to look in (e.g. one decoder block); None
            looks in the whole model.

    Returns:
        Layer name to ``(layer, scheme)``; each scheme's ``format`` is the storage format
        compressed-tensors picks for it (``pack-quantized``, ``int-quantized``, ...).

    Raises:
        ExportError: when a layer's scheme cannot be written in compressed-tensors format
            (the message names the layer and its scheme), or a layer carries a scheme of
            another library (a model transformers loaded from a compressed checkpoint).
    """
    layers = {}
    for name, module in named_modules_within(model, within):
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        if not isinstance(scheme, QuantizationScheme):
            raise ExportError(
                f"layer '{name}' carries a {type(scheme).__module__}.{type(scheme).__name__}, "
                "not a lightning_compress scheme: load compressed checkpoints with "
                "lightning_compress.export.load_compressed to save them again"
            )
        layers[name] = (module, to_ct_scheme(name, module, pack_asymmetric))
    _warn_about_formats(layers)
    _warn_about_unshared_global_scales(layers)
    _warn_about_embeddings(layers)
    return layers


def named_modules_within(
    model: nn.Module, within: Sequence[str] | None
) -> Iterator[tuple[str, nn.Module]]:
    """The modules of ``model`` inside the submodules ``within``, with their full names.

    Args:
        model: the model.
        within: names of its submodules; None for the whole model.

    Yields:
        ``(name, module)`` as ``model.named_modules()`` gives them, each submodule's in turn.

    Raises:
        AttributeError: naming a submodule ``model`` does not have.
    """
    if within is None:
        yield from model.named_modules()
        return
    for prefix in within:
        yield from model.get_submodule(prefix).named_modules(prefix=prefix)


def to_ct_scheme(
    name: str, module: nn.Module, pack_asymmetric: bool = False
) -> CTQuantizationScheme:
    """The compressed-tensors scheme of one quantized layer, with its storage format.

    Args:
        name: the layer's name, for error messages.
        module: the layer; it has a ``quantization_scheme``.
        pack_asymmetric: as :func:`quantized_layers`.

    Returns:
        The scheme, targeting ``name``.

    Raises:
        ExportError: when the scheme cannot be expressed in compressed-tensors format, or
            its format reads back in one dtype only (fp4, MX) and the weight has another.
    """
    scheme: QuantizationScheme = module.quantization_scheme
    weights = scheme.weights
    quant_format = None if weights is None else format_of(*_format_key(weights))
    if quant_format is not None and quant_format.reads_back_in not in (None, module.weight.dtype):
        raise ExportError(
            f"layer '{name}' has {quant_format.name} weights ({scheme.to_dict()}) in "
            f"{module.weight.dtype}: compressed-tensors {compressed_tensors.__version__} reads "
            f"{quant_format.name} back in {quant_format.reads_back_in} only, so transformers "
            f"could not run this checkpoint; quantize the model in {quant_format.reads_back_in} "
            "(model.to(dtype) before compressing)"
        )
    if "weight_g_idx" in module._buffers:
        raise ExportError(
            f"layer '{name}' has scheme {scheme.to_dict()} with a weight_g_idx (GPTQ "
            "actorder='group'/'dynamic': groups in activation order), which the installed "
            "compressed-tensors no longer stores; quantize it with actorder='static'"
        )
    try:
        ct_scheme = CTQuantizationScheme(
            targets=[name],
            **{role: _ct_args(getattr(scheme, role)) for role in ROLES},
        )
    except (ValidationError, ValueError, NotImplementedError) as err:
        raise ExportError(
            f"layer '{name}' has scheme {scheme.to_dict()}, which compressed-tensors cannot "
            f"express: {err}"
        ) from err
    if pack_asymmetric and asymmetric_int_weights(ct_scheme):
        ct_scheme.format = storage_format(type(module), ct_scheme)
    else:
        ct_scheme.format = _loadable_format(name, module, ct_scheme)
    return ct_scheme


def _format_key(args: QuantizationArgs) -> tuple[str, int, str | None]:
    return args.type, args.num_bits, args.scale_dtype


def _loadable_format(name: str, module: nn.Module, ct_scheme: CTQuantizationScheme) -> str:
    """The format compressed-tensors picks for the layer, or :data:`FALLBACK_FORMAT` when
    transformers cannot load that one."""
    preferred = storage_format(type(module), ct_scheme)
    gaps = {}
    for stored_as in dict.fromkeys((preferred, FALLBACK_FORMAT)):
        gaps[stored_as] = _layout_gaps(module, ct_scheme, stored_as)
        if not gaps[stored_as]:
            return stored_as
    raise ExportError(
        f"layer '{name}' has scheme {module.quantization_scheme.to_dict()}, which the installed "
        f"compressed-tensors {compressed_tensors.__version__} writes in a layout transformers "
        f"cannot load: {gaps}"
    )


def _layout_gaps(module: nn.Module, ct_scheme: CTQuantizationScheme, stored_as: str) -> list[str]:
    """How the layout written in format ``stored_as`` differs from what transformers loads."""
    scheme = ct_scheme.model_copy(update={"format": stored_as})
    bias = getattr(module, "bias", None) is not None  # an Embedding has none
    shape = (tuple(module.weight.shape), bias, module.weight.dtype, scheme)
    return differences(written_layout(*shape), prepared_layout(*shape))


def _warn_about_formats(layers: dict[str, tuple[nn.Module, CTQuantizationScheme]]) -> None:
    """Says which layers are stored in :data:`FALLBACK_FORMAT`, or in a format the installed
    transformers cannot load (``pack_asymmetric``), and why."""
    moved, unloadable = {}, {}
    for name, (module, scheme) in layers.items():
        preferred = storage_format(type(module), scheme)
        if scheme.format != preferred:
            moved[name] = preferred
        elif asymmetric_int_weights(scheme) and _layout_gaps(module, scheme, preferred):
            unloadable[name] = preferred
    if moved:
        name, preferred = next(iter(moved.items()))
        module, scheme = layers[name]
        logger.warning(
            "{} layers (e.g. '{}') are stored {} (one int8 code per weight) instead of {}: the "
            "installed compressed-tensors {} writes {} in a layout transformers' "
            "from_pretrained cannot load ({}). vLLM serves int4 from {} only: "
            "save_compressed(..., pack_asymmetric=True) writes that",
            len(moved),
            name,
            FALLBACK_FORMAT,
            preferred,
            compressed_tensors.__version__,
            preferred,
            "; ".join(_layout_gaps(module, scheme, preferred)),
            preferred,
        )
    if unloadable:
        name, preferred = next(iter(unloadable.items()))
        module, scheme = layers[name]
        logger.warning(
            "{} layers (e.g. '{}') are stored {} as asked (pack_asymmetric=True): vLLM and "
            "load_compressed read them, but the installed transformers' from_pretrained "
            "cannot ({})",
            len(unloadable),
            name,
            preferred,
            "; ".join(_layout_gaps(module, scheme, preferred)),
        )


def _warn_about_embeddings(layers: dict[str, tuple[nn.Module, CTQuantizationScheme]]) -> None:
    """Says that vLLM serves no quantized embedding, naming them: its compressed-tensors
    config gives quant methods to linear, attention and mixture-of-experts layers only."""
    embeddings = [name for name, (module, _) in layers.items() if isinstance(module, nn.Embedding)]
    if embeddings:
        logger.warning(
            "quantized embeddings {}: transformers and load_compressed read them, but vLLM "
            "serves no quantized embedding (its compressed-tensors config quantizes linear, "
            "attention and mixture-of-experts layers only); leave Embedding out of the "
            "targets for a checkpoint vLLM serves",
            embeddings,
        )


def _warn_about_unshared_global_scales(
    layers: dict[str, tuple[nn.Module, CTQuantizationScheme]],
) -> None:
    """Says which layers that vLLM fuses (q/k/v, gate/up) hold different global scales
    (NVFP4 trained with quantization-aware training computes one per layer): vLLM applies
    one to the fused matrix, so it would serve them with other weights than saved."""
    unshared = []
    for group in fused_groups(list(layers)):
        scales = [layers[name][0]._buffers.get("weight_global_scale") for name in group]
        if len(group) > 1 and None not in scales and len({float(s) for s in scales}) > 1:
            unshared.append(group)
    if unshared:
        logger.warning(
            "{} sets of layers that vLLM fuses (e.g. {}) hold different NVFP4 global scales: "
            "vLLM applies one global scale to the fused matrix, so it would serve them with "
            "other weights than saved (transformers loads them as saved); one-shot "
            "quantization gives them one shared scale",
            len(unshared),
            unshared[0],
        )


def from_ct_scheme(ct_scheme: CTQuantizationScheme) -> QuantizationScheme:
    """This project's scheme for a compressed-tensors scheme read from a checkpoint.

    Args:
        ct_scheme: the scheme of a config group.

    Returns:
        The equivalent scheme, with the same targets.

    Raises:
        ExportError: when the scheme uses settings this project does not implement.
    """
    try:
        return QuantizationScheme(
            targets=list(ct_scheme.targets),
            **{role: _our_args(getattr(ct_scheme, role)) for role in ROLES},
        )
    except ValueError as err:
        raise ExportError(
            f"checkpoint scheme {ct_scheme.model_dump()} cannot be run by lightning_compress: {err}"
        ) from err


def _ct_args(args: QuantizationArgs | None) -> CTQuantizationArgs | None:
    if args is None:
        return None
    return CTQuantizationArgs(
        num_bits=args.num_bits,
        type=args.type,
        symmetric=args.symmetric,
        strategy=args.strategy,
        group_size=args.group_size,
        dynamic=args.dynamic,
        scale_dtype=None if args.scale_dtype is None else getattr(torch, args.scale_dtype),
        block_structure=None if args.block_structure is None else list(args.block_structure),
    )


def _our_args(args: CTQuantizationArgs | None) -> QuantizationArgs | None:
    if args is None:
        return None
    return QuantizationArgs(
        num_bits=args.num_bits,
        type=str(args.type),
        symmetric=args.symmetric,
        strategy=str(args.strategy),
        group_size=args.group_size,
        dynamic=args.dynamic,
        scale_dtype=_dtype_name(args),
        block_structure=None if args.block_structure is None else tuple(args.block_structure),
    )


def _dtype_name(args: CTQuantizationArgs) -> str | None:
    """The name of a compressed-tensors argument's ``scale_dtype`` (``"float8_e4m3fn"``) where
    it picks one of this project's formats; None where it does not (compressed-tensors also
    sets it to the model's dtype, in which this project keeps scales anyway)."""
    if args.scale_dtype is None:
        return None
    name = str(args.scale_dtype).removeprefix("torch.")
    try:
        format_of(str(args.type), args.num_bits, name)
    except ValueError:
        return None
    return name
