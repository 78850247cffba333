"""What a model-free run does to each tensor of a checkpoint: the recipe's layers resolved on
the model built on the meta device, checked to be data-free, and grouped into work units."""

from __future__ import annotations

from dataclasses import dataclass, field

from compressed_tensors.quantization import QuantizationScheme as CTQuantizationScheme
from torch import nn

from lightning_compress.export.errors import ExportError
from lightning_compress.export.model_free.source import SourceCheckpoint
from lightning_compress.export.schemes import quantized_layers
from lightning_compress.layers.linearize import ADAPTERS
from lightning_compress.modifiers import QuantizationModifier
from lightning_compress.modifiers.quantization import QuantizationScheme
from lightning_compress.modifiers.quantization.fused import fused_groups
from lightning_compress.modifiers.tied_weights import untie_weights
from lightning_compress.recipe import Recipe, RecipeError

__all__ = ["PlannedLayer", "Task", "plan_layers", "plan_tasks"]


@dataclass(frozen=True)
class PlannedLayer:
    """One layer the recipe quantizes, and where its tensors lie.

    Attributes:
        name: the layer's name (its tensors are ``<name>.weight`` and ``<name>.bias``).
        scheme: its quantization scheme.
        ct_scheme: its compressed-tensors scheme, with the storage format.
        weight_key: the checkpoint tensor its weight is read from (the embedding's, for an
            LM head tied to it).
        bias_key: the checkpoint tensor of its bias, or None.
    """

    name: str
    scheme: QuantizationScheme
    ct_scheme: CTQuantizationScheme
    weight_key: str
    bias_key: str | None


@dataclass
class Task:
    """The work of one worker call: quantize some stacks of layers, copy some tensors, and
    write the result as one safetensors file.

    Attributes:
        stacks: stacks of layers; the ``tensor_group`` (NVFP4) layers of a stack share the
            smallest of their global scales, as the in-memory one-shot path gives them.
        copies: checkpoint tensors written unchanged.
        nbytes: the bytes the task reads.
    """

    stacks: list[list[PlannedLayer]] = field(default_factory=list)
    copies: list[str] = field(default_factory=list)
    nbytes: int = 0


def plan_layers(
    recipe: Recipe, model: nn.Module, source: SourceCheckpoint, pack_asymmetric: bool
) -> dict[str, PlannedLayer]:
    """The layers the recipe quantizes, resolved on ``model`` as ``oneshot`` resolves them.

    Each quantized meta module gets its ``quantization_scheme``, so the checkpoint's
    ``quantization_config`` can be written from ``model``.

    Args:
        recipe: the recipe.
        model: the checkpoint's model on the meta device.
        source: the checkpoint.
        pack_asymmetric: as :func:`~lightning_compress.export.save_compressed`.

    Returns:
        The planned layers, in module order.

    Raises:
        RecipeError: naming a modifier that needs data, trains or is not a quantization
            modifier (model-free runs only data-free round-to-nearest), or a layer targeted by
            two modifiers.
        ExportError: naming a module the model-free path cannot read as ``nn.Linear`` layers
            (``Conv1D``, fused experts), or a planned weight that is not in the checkpoint.
    """
    _refuse_adapted_modules(model)
    planned: dict[str, QuantizationScheme] = {}
    for modifier in recipe.modifiers:
        for name, layer in _data_free_plan(modifier, model).items():
            if name in planned:
                raise RecipeError(
                    f"layer '{name}' is targeted by two modifiers of the recipe; expected one"
                )
            planned[name] = layer.settings
    modules = dict(model.named_modules())
    tied = _tied_sources(model)
    # as in memory: a tied LM head gets its own weight, the config says the head is untied
    untie_weights("QuantizationModifier", model, {name: modules[name] for name in planned})
    for name, scheme in planned.items():
        modules[name].quantization_scheme = scheme
    ct_layers = quantized_layers(model, pack_asymmetric)
    layers = {}
    for name in (n for n in modules if n in planned):
        module = modules[name]
        weight_key = _present(f"{name}.weight", tied, source)
        bias = getattr(module, "bias", None)
        layers[name] = PlannedLayer(
            name=name,
            scheme=planned[name],
            ct_scheme=ct_layers[name][1],
            weight_key=weight_key,
            bias_key=None if bias is None else _present(f"{name}.bias", tied, source),
        )
    return layers


def plan_tasks(
    layers: dict[str, PlannedLayer], source: SourceCheckpoint, task_bytes: int
) -> list[Task]:
    """Splits the checkpoint into tasks of at most ``task_bytes`` read (a larger stack or
    tensor gets a task of its own), in checkpoint order.

    Layers that vLLM fuses (q/k/v, gate/up) with equal ``tensor_group`` weight arguments form
    one stack, as in the in-memory one-shot path, and stay in one task.

    Args:
        layers: the planned layers.
        source: the checkpoint.
        task_bytes: the most bytes one task should read.

    Returns:
        The tasks, covering every tensor of the checkpoint once (the embedding an LM head is
        tied to is written as well as the quantized head).

    Raises:
        ValueError: when ``task_bytes`` is not positive.
    """
    if task_bytes <= 0:
        raise ValueError(f"task_bytes: expected a positive int, got {task_bytes}")
    stacks = _stacks(layers)
    first = {f"{stack[0].name}.weight": stack for stack in stacks}
    biases = {layer.bias_key for layer in layers.values()}
    units: list[tuple[list[PlannedLayer] | None, str | None]] = []
    for key in source.tensors:
        if key in first:
            units.append((first.pop(key), None))
        elif key not in biases and not _member_weight(key, layers):
            units.append((None, key))
    units.extend((stack, None) for stack in first.values())  # LM heads tied to an embedding
    tasks = [Task()]
    for stack, copy in units:
        keys = [copy] if stack is None else [k for layer in stack for k in _layer_keys(layer)]
        nbytes = sum(source.tensors[k].nbytes for k in keys)
        if tasks[-1].nbytes and tasks[-1].nbytes + nbytes > task_bytes:
            tasks.append(Task())
        if stack is None:
            tasks[-1].copies.append(copy)
        else:
            tasks[-1].stacks.append(stack)
        tasks[-1].nbytes += nbytes
    return [task for task in tasks if task.stacks or task.copies]


def _member_weight(key: str, layers: dict[str, PlannedLayer]) -> bool:
    """Whether ``key`` is the own weight of a planned layer (written with its stack)."""
    return key.endswith(".weight") and key.removesuffix(".weight") in layers


def _layer_keys(layer: PlannedLayer) -> list[str]:
    return [layer.weight_key] + ([] if layer.bias_key is None else [layer.bias_key])


def _stacks(layers: dict[str, PlannedLayer]) -> list[list[PlannedLayer]]:
    """Fused siblings with equal ``tensor_group`` weight arguments together, others alone
    (as :meth:`~lightning_compress.modifiers.quantization.oneshot.LayerwiseQuantization.stacks`
    groups them)."""
    stacks = []
    for group in fused_groups(list(layers)):
        weights = {layers[name].scheme.weights for name in group}
        shared = len(weights) == 1 and next(iter(weights)).strategy == "tensor_group"
        members = [layers[name] for name in group]
        stacks.extend([members] if shared else [[member] for member in members])
    return stacks


def _data_free_plan(modifier: object, model: nn.Module) -> dict:
    """The layers ``modifier`` quantizes, if it is a data-free one-shot quantization."""
    owner = type(modifier).__name__
    if type(modifier) is not QuantizationModifier:
        raise RecipeError(
            f"{owner} cannot run model-free: the model-free path applies data-free one-shot "
            "QuantizationModifier schemes only (round-to-nearest weights, dynamic activations); "
            "run oneshot with calibration data for this recipe"
        )
    if not modifier.is_one_shot:
        raise RecipeError(
            f"{owner}.start: expected -1 (one-shot) for a model-free run, got {modifier.start} "
            "(quantization-aware training needs a model and data)"
        )
    if modifier.needs_calibration_data:
        raise RecipeError(
            f"{owner} needs calibration data (static input activations or a KV-cache scheme), "
            "which a model-free run does not have; expected weight-only or dynamic-activation "
            "schemes (W4A16, W8A16, FP8_DYNAMIC, NVFP4A16, ...), or run oneshot with a dataset"
        )
    return modifier.plan_layers(model)


def _refuse_adapted_modules(model: nn.Module) -> None:
    """Refuses a model with modules the in-memory path first swaps for ``nn.Linear`` layers
    (``Conv1D``, fused experts): their checkpoint tensors are not laid out as those layers."""
    for name, module in model.named_modules():
        if name and any(adapter.claims(module) for adapter in ADAPTERS):
            raise ExportError(
                f"module '{name}' ({type(module).__name__}) is quantized in memory after "
                "being rebuilt from nn.Linear layers, which the model-free path does not do; "
                "use oneshot for this model"
            )


def _tied_sources(model: nn.Module) -> dict[str, str]:
    """Tied parameter names to the checkpoint name of the tensor they share."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return dict(tied)


def _present(key: str, tied: dict[str, str], source: SourceCheckpoint) -> str:
    """The checkpoint tensor ``key`` is read from (its tied source where it is absent)."""
    if key in source.tensors:
        return key
    if tied.get(key) in source.tensors:
        return tied[key]
    raise ExportError(
        f"tensor '{key}' of a layer the recipe quantizes is not in the checkpoint "
        f"{str(source.path)!r}; the shards do not match the config"
    )
