"""Fused mixture-of-experts weights as one set of ``nn.Linear`` layers per expert.

transformers 5 keeps a mixture's experts fused: ``gate_up_proj`` ``[E, 2I, H]`` (or ``up_proj``
``[E, I, H]`` without a gate) and ``down_proj`` ``[E, H, I]``, in classes decorated with
``use_experts_implementation`` that carry the layout flags ``has_gate``, ``has_bias``,
``is_transposed`` (``[E, in, out]``), ``is_concatenated`` (False: gate and up interleaved) and
``has_post_expert_norm``. :class:`LinearExperts` holds the same weights as
``experts.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` ``nn.Linear`` layers (the names the
reference project's recipes use) and computes the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lightning_compress.layers.known_inputs import inputs_known_ahead
from lightning_compress.layers.linearize import LayerAdapter, register_adapter

__all__ = ["ExpertMLP", "FusedExpertsAdapter", "LinearExperts", "calibrating_all_experts"]

_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


class ExpertMLP(nn.Module):
    """One expert's weight matrices: ``gate_proj`` (when gated), ``up_proj`` and ``down_proj``.

    Args:
        gate_proj: the gate projection, or None for an expert without a gate.
        up_proj: the up projection.
        down_proj: the down projection.
    """

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear):
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj


class LinearExperts(nn.Module):
    """A fused experts module rebuilt from per-expert ``nn.Linear`` layers.

    Children ``"0"`` … ``"E-1"`` are the experts (:class:`ExpertMLP`). The forward takes what the
    fused module took, ``(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k])``, and
    returns ``[T, H]``: each token's routed experts' outputs weighted by the router. With
    ``calibrate_all`` set, every expert also runs on every token (so hooks on its layers see all
    tokens), while the output still sums only the routed experts.

    The forward runs every expert's ``up_proj`` / ``gate_proj`` first, then every ``down_proj``,
    declaring each phase's inputs (:mod:`~lightning_compress.layers.known_inputs`), so a
    staged calibration compresses each phase as one group. The
    experts' hidden activations are held together until the second phase: their routed tokens'
    (``T * k`` rows of the intermediate size), or with ``calibrate_all`` every expert's for every
    token (``E * T`` rows: for 128 experts of 768 and 2048 tokens in bfloat16, 0.4 GB).

    Args:
        original: the fused experts module (it is left unchanged).
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        for key, value in vars(original).items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for key, child in original.named_children():
            self.add_module(key, child)
        self._apply_gate_fn: Callable | None = (
            type(original)._apply_gate if original.has_gate else None
        )
        self.calibrate_all = False
        for index in range(original.down_proj.shape[0]):
            self.add_module(str(index), _expert_from_fused(original, index))

    def experts(self) -> Iterator[ExpertMLP]:
        """The experts, in index order.

        Returns:
            An iterator over the :class:`ExpertMLP` children.
        """
        return (module for module in self.children() if isinstance(module, ExpertMLP))

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Sum each token's routed experts' outputs, weighted by the router.

        Args:
            hidden_states: ``[tokens, hidden]``.
            top_k_index: ``[tokens, k]`` expert of each routing slot.
            top_k_weights: ``[tokens, k]`` router weight of each slot.

        Returns:
            ``[tokens, hidden]``.
        """
        routes = []  # (expert, its tokens, their routing slots, its input)
        for index, expert in enumerate(self.experts()):
            token_idx, slot = torch.where(top_k_index == index)
            if self.calibrate_all:
                routes.append((expert, token_idx, slot, hidden_states))
            elif token_idx.numel():
                routes.append((expert, token_idx, slot, hidden_states[token_idx]))
        # every expert's gated hidden, then every down projection: the layers of each phase
        # read inputs known before the first of them runs (a staged calibration takes each
        # phase as one group)
        first = [(layer, x) for expert, _, _, x in routes for layer in _input_layers(expert)]
        with inputs_known_ahead(first):
            hiddens = [self._gated_hidden(expert, x) for expert, _, _, x in routes]
        pairs = list(zip(routes, hiddens, strict=True))
        output = torch.zeros_like(hidden_states)
        with inputs_known_ahead([(expert.down_proj, hidden) for (expert, *_), hidden in pairs]):
            for (expert, token_idx, slot, _), hidden in pairs:
                out = expert.down_proj(hidden)
                if self.has_post_expert_norm:
                    out = self.post_expert_norm(out)
                if self.calibrate_all:
                    out = out[token_idx]
                weighted = out * top_k_weights[token_idx, slot, None]
                output.index_add_(0, token_idx, weighted.to(output.dtype))
        return output

    def _gated_hidden(self, expert: ExpertMLP, inputs: torch.Tensor) -> torch.Tensor:
        """The input of ``expert``'s down projection."""
        up = expert.up_proj(inputs)
        if self._apply_gate_fn is None:
            return self.act_fn(up)
        gate = expert.gate_proj(inputs)
        if self.is_concatenated:
            gate_up = torch.cat([gate, up], dim=-1)
        else:
            gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
        return self._apply_gate_fn(self, gate_up)


def _input_layers(expert: ExpertMLP) -> list[nn.Linear]:
    """The layers of ``expert`` that read its input: ``up_proj`` and, when gated, ``gate_proj``."""
    gate = getattr(expert, "gate_proj", None)
    return [expert.up_proj] if gate is None else [expert.up_proj, gate]


def _expert_from_fused(original: nn.Module, index: int) -> ExpertMLP:
    """Expert ``index`` of a fused module as an :class:`ExpertMLP` (weights copied)."""
    down = _linear(original, "down_proj", index)
    if not original.has_gate:
        return ExpertMLP(None, _linear(original, "up_proj", index), down)
    weight = _matrix(original, "gate_up_proj", index)
    bias = original.gate_up_proj_bias[index] if original.has_bias else None
    halves = []
    for half in range(2):
        if original.is_concatenated:
            rows = slice(half * weight.shape[0] // 2, (half + 1) * weight.shape[0] // 2)
        else:
            rows = slice(half, None, 2)
        halves.append(
            _make_linear(weight[rows], None if bias is None else bias[rows], original.gate_up_proj)
        )
    return ExpertMLP(halves[0], halves[1], down)


def _joined(
    original: nn.Module, layer: nn.Linear | tuple[nn.Linear, nn.Linear]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One expert's ``[out, in]`` weight and bias of a fused parameter: a layer's own, or the
    gate's and the up projection's joined in the module's layout (concatenated or
    interleaved)."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias
    gate, up = layer
    if original.is_concatenated:
        weight = torch.cat([gate.weight, up.weight])
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
    else:
        weight = torch.stack([gate.weight, up.weight], dim=1).flatten(0, 1)
        bias = None if gate.bias is None else torch.stack([gate.bias, up.bias], 1).flatten()
    return weight, bias


def _matrix(original: nn.Module, name: str, index: int) -> torch.Tensor:
    """Expert ``index``'s ``[out, in]`` matrix of the fused parameter ``name``."""
    weight = getattr(original, name)[index].detach()
    return weight.t() if original.is_transposed else weight


def _linear(original: nn.Module, name: str, index: int) -> nn.Linear:
    bias = getattr(original, f"{name}_bias")[index] if original.has_bias else None
    return _make_linear(_matrix(original, name, index), bias, getattr(original, name))


def _make_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, source: nn.Parameter
) -> nn.Linear:
    """An ``nn.Linear`` holding copies of ``weight`` and ``bias``, trainable like ``source``."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(
        weight.detach().clone(memory_format=torch.contiguous_format),
        requires_grad=source.requires_grad,
    )
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=source.requires_grad)
    return linear


class FusedExpertsAdapter(LayerAdapter):
    """Replaces transformers' fused experts modules by :class:`LinearExperts`."""

    def claims(self, module: nn.Module) -> bool:
        """Whether ``module`` is a fused experts module (layout flags and a 3-D ``down_proj``).

        Args:
            module: a module of the model.

        Returns:
            True for transformers' ``use_experts_implementation`` experts classes.
        """
        down = getattr(module, "down_proj", None)
        return (
            all(isinstance(getattr(module, flag, None), bool) for flag in _LAYOUT_FLAGS)
            and isinstance(down, nn.Parameter)
            and down.dim() == 3
        )

    def check(self, module: nn.Module, name: str) -> None:
        """Refuse a fused layout whose shapes do not fit together.

        Args:
            module: a claimed fused experts module.
            name: its qualified name.

        Raises:
            ValueError: naming the parameter and the shape expected.
        """
        up_name = "gate_up_proj" if module.has_gate else "up_proj"
        up = getattr(module, up_name, None)
        down = module.down_proj
        where = f"{name} ({type(module).__name__})"
        if not isinstance(up, nn.Parameter) or up.dim() != 3:
            raise ValueError(
                f"{where}: expected a 3-D parameter {up_name} [experts, out, in], found "
                f"{None if up is None else tuple(up.shape)}"
            )
        up_out, up_in = (up.shape[2], up.shape[1]) if module.is_transposed else up.shape[1:]
        down_out, down_in = (
            (down.shape[2], down.shape[1]) if module.is_transposed else down.shape[1:]
        )
        intermediate = up_out // 2 if module.has_gate else up_out
        if (
            up.shape[0] != down.shape[0]
            or down_in != intermediate
            or down_out != up_in
            or (module.has_gate and up_out % 2)
        ):
            raise ValueError(
                f"{where}: {up_name} {tuple(up.shape)} and down_proj {tuple(down.shape)} do "
                "not fit one expert MLP; expected the same number of experts, down_proj's "
                f"input = {up_name}'s output{' / 2' if module.has_gate else ''}, and "
                f"down_proj's output = {up_name}'s input"
            )
        if module.has_post_expert_norm and not isinstance(
            getattr(module, "post_expert_norm", None), nn.Module
        ):
            raise ValueError(
                f"{where}: has_post_expert_norm is set but post_expert_norm is missing"
            )
        if not module.has_gate and not isinstance(getattr(module, "act_fn", None), nn.Module):
            raise ValueError(f"{where}: an expert without a gate needs act_fn, found none")
        if module.has_bias:
            for bias_name, out in ((f"{up_name}_bias", up_out), ("down_proj_bias", down_out)):
                bias = getattr(module, bias_name, None)
                if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (down.shape[0], out):
                    raise ValueError(
                        f"{where}: has_bias is set; expected {bias_name} of shape "
                        f"{(down.shape[0], out)}, found "
                        f"{None if bias is None else tuple(bias.shape)}"
                    )

    def linearize(self, module: nn.Module) -> nn.Module:
        """Build the :class:`LinearExperts` equal to ``module``.

        Args:
            module: a claimed, checked fused experts module.

        Returns:
            The replacement.
        """
        return LinearExperts(module)

    def release(self, module: nn.Module) -> None:
        """Free the fused parameters (each keeps its dtype and device, with no elements).

        Args:
            module: a fused experts module that was replaced.
        """
        for param in module.parameters(recurse=False):
            param.data = param.data.new_empty(0)

    def restore(self, module: nn.Module, replacement: nn.Module) -> None:
        """Rebuild the fused parameters from the per-expert layers, in the module's layout.

        Args:
            module: the fused experts module whose parameters were released.
            replacement: its :class:`LinearExperts`.
        """
        experts = list(replacement.experts())
        fused: dict[str, list[torch.Tensor]] = {}
        for expert in experts:
            layers = {"down_proj": expert.down_proj}
            if module.has_gate:
                layers["gate_up_proj"] = (expert.gate_proj, expert.up_proj)
            else:
                layers["up_proj"] = expert.up_proj
            for name, layer in layers.items():
                weight, bias = _joined(module, layer)
                fused.setdefault(name, []).append(weight.t() if module.is_transposed else weight)
                if module.has_bias:
                    fused.setdefault(f"{name}_bias", []).append(bias)
        with torch.no_grad():
            for name, tensors in fused.items():
                getattr(module, name).data = torch.stack([t.detach() for t in tensors])


@contextmanager
def calibrating_all_experts(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within the block, every expert of ``model`` runs on every token (routing still decides
    the output), so each expert's calibration statistics come from all tokens.

    Args:
        model: the model whose :class:`LinearExperts` are switched.
        enabled: False leaves the routed-only behaviour (each expert sees its tokens only).

    Yields:
        None; on exit every expert is back to routed-only.
    """
    modules = [m for m in model.modules() if isinstance(m, LinearExperts)]
    for module in modules:
        module.calibrate_all = enabled
    try:
        yield
    finally:
        for module in modules:
            module.calibrate_all = False


register_adapter(FusedExpertsAdapter())
