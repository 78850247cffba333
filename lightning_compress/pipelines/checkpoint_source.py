"""A model built empty from its checkpoint directory, whose modules are read in when needed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lightning_compress.core.checkpoint_files import CONFIG_NAME, CheckpointFiles
from lightning_compress.core.heap import map_large_allocations, return_free_heap

__all__ = ["CheckpointSource"]


class CheckpointSource:
    """A transformers causal LM whose weights stay in its safetensors files until a module
    needs them.

    The model is built from the directory's ``config.json`` with its parameters on the meta
    device (no memory) and its non-persistent buffers (rotary frequencies) computed on the CPU
    as transformers computes them; it has the checkpoint's dtype (the config's ``dtype``, else
    the stored tensors'). ``load(module)`` reads the module's weights from the shards
    (memory-mapped) onto the CPU; ``release(module)`` gives their memory back (they return to
    the meta device). Tied weights (the input embeddings and ``lm_head``) stay one tensor
    until something unties them. Every parameter and persistent buffer of the model is checked
    against the checkpoint's tensors (names, shapes) when the source is made, reading only the
    files' headers. Making a source fixes glibc's threshold for giving large allocations their
    own mapping (:func:`~lightning_compress.core.heap.map_large_allocations`), for the rest of
    the process, so that the memory of calibrating a block does not drift from block to block.

    Models whose checkpoint names differ from their module names (transformers 5 converts
    them while loading: fused mixture-of-experts weights, renamed prefixes) are refused; dense
    decoders (Llama, Qwen2, Mistral, ...) store their modules' names.

    Args:
        directory: a local transformers checkpoint (``config.json``, safetensors shards).
        trust_remote_code: let transformers run the checkpoint's own modeling code.

    Raises:
        FileNotFoundError: if the directory lacks ``config.json`` or safetensors files.
        ValueError: if transformers cannot build the model class (named), the model's
            checkpoint is converted while loading, or the shards do not match the config
            (missing, unexpected or misshapen tensors, named).
        ImportError: without transformers (the ``hf`` extra).
    """

    def __init__(self, directory: str | Path, trust_remote_code: bool = False) -> None:
        self.files = CheckpointFiles(directory)
        self.model = _empty_model(self.files, trust_remote_code)
        self._stored = _stored_names(self.model, self.files)
        map_large_allocations()

    def load(self, module: nn.Module) -> None:
        """Reads the weights of ``module`` (a submodule of the model, or the model) that are
        still on the meta device from the checkpoint, onto the CPU.

        A tensor tied to other modules' is read once and stays tied to them.

        Args:
            module: the module.

        Raises:
            ValueError: if the module holds a tensor on the meta device that the checkpoint
                does not (one added to the empty model since it was built), naming it.
        """
        with torch.no_grad():
            for name, tensor in self._meta_tensors(module):
                stored = self.files.tensor(self._stored[name])
                value = torch.empty_like(tensor, device="cpu").copy_(stored)
                self._replace(tensor, value)

    def release(self, module: nn.Module) -> None:
        """Gives back the memory of the weights of ``module`` read from the checkpoint, and of
        every tensor added to it since (scales, zero points): they go to the meta device, and
        the C heap's free pages go back to the operating system (else the heap would keep
        what each block freed, and resident memory would grow with the number of blocks).

        Args:
            module: the module.
        """
        for submodule in module.modules():
            for tensors in (submodule._parameters, submodule._buffers):
                for key, tensor in tensors.items():
                    if tensor is None or tensor.is_meta or _is_computed_buffer(submodule, key):
                        continue
                    self._replace(tensor, tensor.to("meta"))
        return_free_heap()

    def loaded(self, module: nn.Module) -> bool:
        """Whether every checkpoint weight of ``module`` is in memory.

        Args:
            module: the module.

        Returns:
            True when none of them is on the meta device.
        """
        prefix = self.name_of(module)
        return not any(
            tensor.is_meta
            for name, tensor in module.state_dict(prefix=f"{prefix}." if prefix else "").items()
            if name in self._stored
        )

    def name_of(self, module: nn.Module) -> str:
        """The module's name in the model.

        Args:
            module: a submodule of the model (or the model: ``""``).

        Returns:
            The name.

        Raises:
            ValueError: if ``module`` is not part of the model.
        """
        for name, candidate in self.model.named_modules():
            if candidate is module:
                return name
        raise ValueError(f"{type(module).__name__} is not a module of {type(self.model).__name__}")

    def _meta_tensors(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        prefix = self.name_of(module)
        found: dict[int, tuple[str, torch.Tensor]] = {}
        for submodule_name, submodule in module.named_modules(prefix=prefix):
            for tensors in (submodule._parameters, submodule._buffers):
                for key, tensor in tensors.items():
                    if tensor is not None and tensor.is_meta and id(tensor) not in found:
                        name = f"{submodule_name}.{key}" if submodule_name else key
                        found[id(tensor)] = (name, tensor)
        unknown = [name for name, _ in found.values() if name not in self._stored]
        if unknown:
            raise ValueError(
                f"{type(module).__name__} {prefix!r} has tensors on the meta device that the "
                f"checkpoint does not hold: {unknown}; expected only the model's own weights"
            )
        return list(found.values())

    def _replace(self, old: torch.Tensor, value: torch.Tensor) -> None:
        """Puts ``value`` wherever the model holds ``old`` (a parameter stays a parameter)."""
        new = nn.Parameter(value, requires_grad=old.requires_grad) if _is_param(old) else value
        for module in self.model.modules():
            for tensors in (module._parameters, module._buffers):
                for key, tensor in tensors.items():
                    if tensor is old:
                        tensors[key] = new


def _is_param(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter)


def _is_computed_buffer(module: nn.Module, key: str) -> bool:
    """Non-persistent buffers (rotary frequencies) are computed at build, not stored."""
    return key in module._buffers and key in module._non_persistent_buffers_set


def _stored_names(model: nn.Module, files: CheckpointFiles) -> dict[str, str]:
    """The checkpoint name to read each of the model's tensors from (a tied tensor from the
    name it is stored under).

    Raises:
        ValueError: naming the tensors the checkpoint lacks, has too many, or has in another
            shape.
    """
    state = model.state_dict(keep_vars=True)
    aliases: dict[int, list[str]] = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    stored: dict[str, str] = {}
    missing, misshapen = [], []
    for names in aliases.values():
        present = [name for name in names if name in files.tensors]
        if not present:
            missing.append(names[0])
            continue
        tensor = state[present[0]]
        shape = files.tensors[present[0]].shape
        if tuple(tensor.shape) != shape:
            misshapen.append(f"{present[0]} (stored {list(shape)}, config {list(tensor.shape)})")
        stored.update(dict.fromkeys(names, present[0]))
    unexpected = sorted(set(files.tensors) - set(state))
    problems = []
    if missing:
        problems.append(f"missing tensors {missing[:8]}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        more = " ..." if len(unexpected) > 8 else ""
        problems.append(f"unexpected tensors {unexpected[:8]}{more}")
    if misshapen:
        problems.append(f"tensors of another shape: {misshapen[:8]}")
    if problems:
        raise ValueError(
            f"model: the shards of {str(files.directory)!r} do not match its config.json "
            f"({type(model).__name__}): {'; '.join(problems)}"
        )
    return stored


def _empty_model(files: CheckpointFiles, trust_remote_code: bool) -> nn.Module:
    """The config's causal LM, parameters on the meta device, in the checkpoint's dtype.

    Raises:
        ValueError: if transformers cannot build it, or converts its checkpoint's names.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.conversion_mapping import extract_weight_conversions_for_model

    directory = files.directory
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, OSError) as error:
        model_type = files.config().get("model_type")
        what = f"the config of model_type {model_type!r}"
        raise ValueError(_unbuildable(directory, what, error, trust_remote_code)) from error
    dtype = _config_dtype(config) or files.floating_dtype() or torch.float32
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(
                config, dtype=dtype, trust_remote_code=trust_remote_code
            )
    except (ValueError, KeyError, ImportError, TypeError) as error:
        architectures = getattr(config, "architectures", None) or [type(config).__name__]
        raise ValueError(
            _unbuildable(directory, architectures[0], error, trust_remote_code)
        ) from error
    if extract_weight_conversions_for_model(model):
        raise ValueError(
            f"model: {type(model).__name__} ({config.model_type}) stores its weights under "
            f"other names than its modules (transformers converts them while loading, e.g. "
            f"fused experts); compressing from the checkpoint reads dense decoders (Llama, "
            f"Qwen2, Mistral, ...): load this model in memory and pass the module"
        )
    model.tie_weights()
    model.eval()
    return model


def _config_dtype(config: object) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _unbuildable(directory: Path, what: str, error: Exception, trust_remote_code: bool) -> str:
    message = (
        f"model: transformers cannot build {what} from {str(directory)!r} "
        f"({type(error).__name__}: {error})"
    )
    if not trust_remote_code and '"auto_map"' in (directory / CONFIG_NAME).read_text():
        message += (
            "; the checkpoint brings its own modeling code (auto_map in config.json), which "
            "runs only with trust_remote_code=True"
        )
    return message
