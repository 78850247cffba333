"""transformers' ``Conv1D`` (GPT-2, GPT) made an ``nn.Linear``.

``Conv1D`` computes ``x @ weight + bias`` with its weight stored ``[in, out]``: an
``nn.Linear`` whose weight is stored transposed. :class:`Conv1DAdapter` swaps it for a
:class:`Conv1D` here, an ``nn.Linear`` holding the transposed weight (``[out, in]``), so
every algorithm treats GPT-2's layers as any other linear layer. Checkpoints keep the
``Conv1D`` orientation of ``.weight`` that transformers and vLLM read
(:func:`conv1d_orientation`).
"""

from __future__ import annotations

import sys

from torch import Tensor, nn

from lightning_compress.layers.linearize import LayerAdapter, register_adapter

__all__ = ["Conv1D", "Conv1DAdapter", "conv1d_orientation"]


class Conv1D(nn.Linear):
    """An ``nn.Linear`` standing in for transformers' ``Conv1D``.

    Named as the layer it replaces, so a recipe target ``Conv1D`` still selects it, while
    ``Linear`` selects it as every linear layer. Its weight is ``[out, in]``; checkpoints
    store ``.weight`` as ``Conv1D`` does, ``[in, out]`` (:func:`conv1d_orientation`).
    """


class Conv1DAdapter(LayerAdapter):
    """Replaces transformers' ``Conv1D`` with an equivalent :class:`Conv1D` ``nn.Linear``."""

    def claims(self, module: nn.Module) -> bool:
        """Whether ``module`` is a transformers ``Conv1D``.

        Args:
            module: a module of the model.

        Returns:
            True for transformers' ``Conv1D`` (and subclasses).
        """
        transformers_conv1d = _transformers_conv1d()
        return transformers_conv1d is not None and isinstance(module, transformers_conv1d)

    def check(self, module: nn.Module, name: str) -> None:
        """Refuses a ``Conv1D`` whose weight is not a ``[nx, nf]`` matrix.

        Args:
            module: a transformers ``Conv1D``.
            name: its name in the model.

        Raises:
            ValueError: naming the layer, when its weight is not ``[nx, nf]`` or its bias
                not ``[nf]``.
        """
        weight, bias = module.weight, module.bias
        if tuple(weight.shape) != (module.nx, module.nf) or (
            bias is not None and tuple(bias.shape) != (module.nf,)
        ):
            raise ValueError(
                f"Conv1D '{name}': weight {tuple(weight.shape)} and bias "
                f"{None if bias is None else tuple(bias.shape)}; expected a weight "
                f"[nx, nf] = [{module.nx}, {module.nf}] and a bias [{module.nf}]"
            )

    def linearize(self, module: nn.Module) -> Conv1D:
        """Builds the ``nn.Linear`` equal to ``module``.

        Args:
            module: a transformers ``Conv1D``.

        Returns:
            A :class:`Conv1D` with ``weight = module.weight.T`` (a copy) and the same bias, in
            the same dtype and device and with the same ``requires_grad``, in the training
            mode of ``module``.
        """
        weight, bias = module.weight, module.bias
        linear = Conv1D(
            module.nx, module.nf, bias=bias is not None, device="meta", dtype=weight.dtype
        )
        linear.weight = nn.Parameter(
            weight.detach().t().contiguous(), requires_grad=weight.requires_grad
        )
        if bias is not None:
            linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        return linear.train(module.training)


def conv1d_orientation(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Turns the ``.weight`` of every :class:`Conv1D` in ``model`` between the two layouts.

    In memory the weight is ``[out, in]`` (``nn.Linear``); in a checkpoint it is ``[in, out]``
    (transformers' ``Conv1D``, which vLLM's GPT-2 transposes back on loading: every tensor
    named ``.weight``, quantized or not). Other tensors of the layer (``weight_packed``,
    ``weight_scale``, ...) are in ``nn.Linear`` layout in both, as compressed-tensors stores
    them. Transposing is its own inverse, so this serves saving and loading alike.

    Args:
        model: the model whose ``Conv1D`` layers were linearized.
        tensors: checkpoint names to tensors.

    Returns:
        ``tensors`` with each such ``.weight`` transposed (contiguous); the others as they are.
    """
    keys = {
        f"{name}.weight" for name, module in model.named_modules() if isinstance(module, Conv1D)
    }
    return {
        key: tensor.t().contiguous() if key in keys else tensor for key, tensor in tensors.items()
    }


register_adapter(Conv1DAdapter())


def _transformers_conv1d() -> type | None:
    """transformers' ``Conv1D`` class, or None when transformers was never imported.

    A model cannot hold a transformers ``Conv1D`` before transformers is imported, so the
    check never imports it (transformers is an optional extra).
    """
    module = sys.modules.get("transformers.pytorch_utils")
    return getattr(module, "Conv1D", None)
