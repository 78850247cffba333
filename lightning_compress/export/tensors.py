"""The tensors of a compressed-tensors checkpoint: quantized layers packed by compressed-tensors."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import NamedTuple

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import Tensor, nn

from lightning_compress.core.progress import progress_bar
from lightning_compress.export.errors import ExportError
from lightning_compress.export.layout import (
    asymmetric_int_weights,
    differences,
    layout_of,
    prepared_layout,
    written_layout,
)
from lightning_compress.export.packing import pack_layer
from lightning_compress.export.readback import ReadBackCheck

__all__ = [
    "CompressedState",
    "compress_layer",
    "compressed_state_dict",
    "state_within",
    "tied_names",
]

Layers = dict[str, tuple[nn.Module, CTQuantizationScheme]]
PACKED = CompressionFormat.pack_quantized.value


class CompressedState(NamedTuple):
    """A checkpoint's tensors, and what packing them counted on the way.

    Attributes:
        tensors: checkpoint names to tensors, in ``state_dict`` order.
        zeros: the number of zero weights of each quantized layer whose weight equals its
            codes times its scales exactly (counted on the int8 codes), by layer name.
    """

    tensors: dict[str, Tensor]
    zeros: dict[str, int]


def compressed_state_dict(
    model: nn.Module,
    layers: Layers,
    progress: bool = False,
    within: Sequence[str] | None = None,
    aliases: Collection[str] = (),
    check: ReadBackCheck | None = None,
) -> CompressedState:
    """``model``'s state dict with each quantized layer in its compressed-tensors format.

    Tensors shared by several names (tied embeddings) are kept once, under the first name.

    Args:
        model: the model.
        layers: its quantized layers with their compressed-tensors schemes.
        progress: show a progress bar over the tensors (on stderr, when it is a terminal).
        within: names of submodules of ``model`` whose tensors to give (e.g. one decoder
            block, as a checkpoint written block by block does); None gives all of them.
        aliases: tensor names to leave out: second names of tensors written under their
            first (:func:`tied_names`, taken while the weights were tied).
        check: the read-back check of the save (a checkpoint written in parts keeps one);
            None starts one.

    Returns:
        The tensors, with the zero counts of the layers packed from exact codes.

    Raises:
        ExportError: when a layer's weight does not read back as it is in memory.
    """
    state = state_within(model, within, aliases)
    per_layer: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        owner, _, attribute = key.rpartition(".")
        if owner in layers:
            per_layer.setdefault(owner, {})[attribute] = tensor
    check = ReadBackCheck() if check is None else check
    out: dict[str, Tensor] = {}
    zeros: dict[str, int] = {}
    seen: set[tuple[torch.device, int, torch.Size, torch.dtype]] = set()
    for key, tensor in progress_bar(state.items(), "Saving tensors", len(state), progress):
        owner = key.rpartition(".")[0]
        if owner in layers:
            if owner in per_layer:  # the layer's first tensor: write all of them packed
                packed, zero_count = compress_layer(
                    owner, per_layer.pop(owner), layers[owner][1], check
                )
                out.update({f"{owner}.{name}": value for name, value in packed.items()})
                if zero_count is not None:
                    zeros[owner] = zero_count
            continue
        view = (tensor.device, tensor.data_ptr(), tensor.shape, tensor.dtype)
        if view in seen and tensor.numel():
            continue
        seen.add(view)
        out[key] = tensor
    return CompressedState(out, zeros)


def tied_names(model: nn.Module) -> list[str]:
    """The state-dict names of ``model`` that are a second name of an earlier tensor.

    Tied weights (an output head sharing the embedding's weight) are one parameter under
    two names; the checkpoint keeps the first. Told apart by the parameter itself, so this
    holds on the meta device too.

    Args:
        model: the model.

    Returns:
        The later names of each shared tensor, in state-dict order.
    """
    first: dict[int, str] = {}
    later = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in first:
            later.append(key)
        else:
            first[id(tensor)] = key
    return later


def state_within(
    model: nn.Module, within: Sequence[str] | None = None, aliases: Collection[str] = ()
) -> dict[str, Tensor]:
    """``model``'s state dict, limited to some submodules and without some names.

    Args:
        model: the model.
        within: names of its submodules whose tensors to give (``""`` is the whole model);
            None gives all.
        aliases: tensor names to leave out.

    Returns:
        Tensor names to (detached) tensors, in state-dict order.
    """
    return {
        key: tensor
        for key, tensor in model.state_dict().items()
        if key not in aliases
        and (within is None or any(not name or key.startswith(f"{name}.") for name in within))
    }


def compress_layer(
    name: str,
    tensors: dict[str, Tensor],
    scheme: CTQuantizationScheme,
    check: ReadBackCheck,
) -> tuple[dict[str, Tensor], int | None]:
    """Packs one quantized layer (:func:`~lightning_compress.export.packing.pack_layer`), and
    checks it reads back unchanged (:class:`~lightning_compress.export.readback.ReadBackCheck`)
    and in the layout transformers prepares to load.

    Args:
        name: the layer's name, for error messages.
        tensors: its tensors by local name (``weight``, ``weight_scale``, ...).
        scheme: its compressed-tensors scheme, with ``format`` set.
        check: the read-back check of the save the layer belongs to.

    Returns:
        The compressed tensors by local name (e.g. ``weight_packed``, ``weight_shape``,
        ``weight_scale``), and the number of zero weights where the codes reproduce the
        weight exactly (else None).

    Raises:
        ExportError: when the stored weight would read back different from
            ``tensors["weight"]``: the weight is not finite or not on the grid of its qparams,
            so it changed after quantization; or when the stored tensors differ from those
            transformers' ``from_pretrained`` prepares for the layer (for asymmetric layers
            stored ``pack-quantized``: from those compressed-tensors writes).
    """
    packed = pack_layer(tensors, scheme)
    weight = tensors["weight"]
    # Asymmetric layers are stored pack-quantized only where transformers loads that layout,
    # or on request (``pack_asymmetric``): then what compressed-tensors writes is the target.
    packed_asymmetric = asymmetric_int_weights(scheme) and scheme.format == PACKED
    layout = written_layout if packed_asymmetric else prepared_layout
    expected = layout(tuple(weight.shape), "bias" in tensors, weight.dtype, scheme)
    gaps = differences(layout_of(packed.tensors), expected)
    if gaps:
        raise ExportError(
            f"layer '{name}' would be stored ({scheme.format}) in a layout transformers "
            f"cannot load: {'; '.join(gaps)}"
        )
    if check(name, tensors, packed, scheme):
        return packed.tensors, packed.codes.numel() - int(torch.count_nonzero(packed.codes))
    return packed.tensors, None
