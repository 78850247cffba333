"""Whether transformers' ``from_pretrained`` reads a checkpoint's experts as they were saved.

transformers 5 does not build quantized experts: while merging per-expert keys into its fused
experts it dequantizes them with its own converter
(``transformers.integrations.compressed_tensors.CompressedTensorsDequantize``), which handles
fewer formats than compressed-tensors' compressors. transformers 5.25 rebuilds each packed
expert from ``weight_packed`` / ``weight_scale`` / ``weight_shape`` only, so NVFP4 experts lose
their ``weight_global_scale`` (their weights come out scaled by it), and multiplies fp8 experts
by their ``weight_scale`` as one factor per row, which MX (E8M0 group exponents) and block
scales are not. Saving runs that converter on one expert layer of each format and says which
formats it reads differently from the model in memory; ``load_compressed`` and vLLM read them
as saved.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import transformers
from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from loguru import logger
from torch import Tensor, nn

from lightning_compress.layers.expert_names import expert_checkpoint_names

__all__ = ["misread_expert_formats"]

_PROBE = "experts.*.probe"
"""The layer name handed to transformers' converter (it reads the tensor names' leaves)."""


def misread_expert_formats(
    model: nn.Module,
    layers: dict[str, tuple[nn.Module, CTQuantizationScheme]],
    tensors: dict[str, Tensor],
) -> dict[str, str]:
    """The formats of per-expert layers that transformers' ``from_pretrained`` misreads, warned.

    Args:
        model: the linearized model being saved.
        layers: its quantized layers with their compressed-tensors schemes (``format`` set).
        tensors: the checkpoint's tensors under the model's layer names.

    Returns:
        Format to what goes wrong, for each format transformers reads differently than saved
        (an empty dict when it reads them all, or the model has no experts).
    """
    experts = expert_checkpoint_names(model)
    probed: dict[str, str | None] = {}
    examples: dict[str, list[str]] = {}
    for name, (module, scheme) in layers.items():
        if name not in experts:
            continue
        examples.setdefault(scheme.format, []).append(name)
        if scheme.format not in probed:
            probed[scheme.format] = _misreading(module, scheme, _local(tensors, name))
    misread = {fmt: problem for fmt, problem in probed.items() if problem is not None}
    for fmt, problem in misread.items():
        names = examples[fmt]
        logger.warning(
            "from_pretrained of transformers {} reads the {} {} expert layers of this "
            "checkpoint (e.g. '{}') differently from the model saved: {}. load_compressed and "
            "vLLM read them as saved",
            transformers.__version__,
            len(names),
            fmt,
            names[0],
            problem,
        )
    return misread


def _local(tensors: dict[str, Tensor], layer: str) -> dict[str, Tensor]:
    prefix = f"{layer}."
    return {
        key.removeprefix(prefix): value
        for key, value in tensors.items()
        if key.startswith(prefix) and "." not in key.removeprefix(prefix)
    }


def _misreading(
    module: nn.Module, scheme: CTQuantizationScheme, stored: dict[str, Tensor]
) -> str | None:
    """What transformers' expert converter does wrong with one stored expert layer, or None
    when it gives the layer's weight exactly."""
    from transformers.integrations.compressed_tensors import CompressedTensorsDequantize

    weight = module.weight.detach()
    quantizer = SimpleNamespace(compressor=SimpleNamespace(quantization_config=scheme))
    owner = SimpleNamespace(get_parameter=lambda _: weight)
    inputs = {
        f"{_PROBE}.{leaf}": [tensor] for leaf, tensor in stored.items() if leaf.startswith("weight")
    }
    try:
        out = CompressedTensorsDequantize(quantizer, scheme).convert(
            inputs, source_patterns=[], target_patterns=[], full_layer_name=_PROBE, model=owner
        )
    except Exception as err:  # noqa: BLE001 - any failure of the converter is the finding
        return f"its converter fails ({type(err).__name__}: {err})"
    read = [value for value in out.values() if torch.is_tensor(value) and value.dim() == 3]
    if len(read) != 1:
        return f"its converter returns no expert weight (it returned {sorted(out)})"
    got = read[0][0]
    if got.shape != weight.shape:
        return f"its converter gives weights of shape {tuple(got.shape)}, not {tuple(weight.shape)}"
    if not torch.equal(got.to(weight.dtype), weight):
        largest = (got.float() - weight.float()).abs().max().item()
        return f"its converter gives other weights (largest difference {largest:.3g})"
    return None
