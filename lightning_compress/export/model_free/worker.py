"""One model-free task: read its tensors from the checkpoint (memory-mapped), quantize its
layers as the in-memory round-to-nearest path does, pack them as ``save_compressed`` packs
them, and write the result as one safetensors file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from lightning_compress.core.checkpoint_files import CheckpointFiles
from lightning_compress.export.errors import ExportError
from lightning_compress.export.model_free.plan import PlannedLayer, Task
from lightning_compress.export.readback import ReadBackCheck
from lightning_compress.export.tensors import compress_layer
from lightning_compress.modifiers.quantization.calibration import quantize_layer
from lightning_compress.modifiers.quantization.ops import global_scale

__all__ = ["run_task"]


def run_task(files: CheckpointFiles, task: Task, output: Path) -> list[str]:
    """Writes the tensors of ``task`` to the safetensors file ``output``.

    Args:
        files: the checkpoint (its tensors are read one at a time, memory-mapped).
        task: the task.
        output: the file to write.

    Returns:
        The names of the tensors written.

    Raises:
        ExportError: naming a layer whose weight is not finite, or that does not read back
            as quantized (as :func:`~lightning_compress.export.tensors.compress_layer`).
        ValueError: naming an NVFP4 layer whose weight is all zero.
    """
    out: dict[str, Tensor] = {}
    check = ReadBackCheck()
    with torch.no_grad():
        for stack in task.stacks:
            for layer, tensors in _quantized_stack(stack, files):
                packed, _ = compress_layer(layer.name, tensors, layer.ct_scheme, check)
                out.update({f"{layer.name}.{key}": value for key, value in packed.items()})
        for key in task.copies:
            out[key] = files.tensor(key)
    save_file({k: v.contiguous() for k, v in out.items()}, output, metadata={"format": "pt"})
    return list(out)


def _quantized_stack(
    stack: list[PlannedLayer], files: CheckpointFiles
) -> list[tuple[PlannedLayer, dict[str, Tensor]]]:
    """Each layer of ``stack`` quantized: its weight, bias and qparams by local name."""
    holders = [(layer, _holder(layer, files)) for layer in stack]
    shared = None
    if len(stack) > 1:  # tensor_group siblings: the smallest global scale of the stack
        scales = [
            global_scale(module.weight, layer.scheme.weights, f"layer '{layer.name}' weight")
            for layer, module in holders
        ]
        shared = torch.cat(scales).amin().reshape(1)
    results = []
    for layer, module in holders:
        result = quantize_layer(module, layer.scheme, None, layer.name, shared)
        tensors = {"weight": result.weight}
        if layer.bias_key is not None:
            tensors["bias"] = files.tensor(layer.bias_key)
        tensors.update(result.buffers)
        results.append((layer, tensors))
    return results


def _holder(layer: PlannedLayer, files: CheckpointFiles) -> nn.Module:
    """A module holding the layer's weight, as the round-to-nearest computation reads it."""
    weight = files.tensor(layer.weight_key)
    if not bool(torch.isfinite(weight).all()):
        raise ExportError(
            f"layer '{layer.name}' has NaN or Inf weights (tensor '{layer.weight_key}'); "
            "expected finite weights to quantize, or add the layer to ignore"
        )
    module = nn.Module()
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module
