"""``SmoothQuantModifier``: move activation outliers into the weights before quantization."""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_compress.modifiers.smoothing.base import SmoothingModifier
from lightning_compress.modifiers.smoothing.folding import SmoothingMapping, linear_weight

__all__ = ["MIN_SCALE", "SmoothQuantModifier", "smoothquant_scale"]

MIN_SCALE = 1e-5
"""Floor of activation and weight magnitudes and of the scale itself, so none is 0."""


def smoothquant_scale(act_absmax: Tensor, weight_absmax: Tensor, strength: float) -> Tensor:
    """SmoothQuant's per-channel scale ``s = max|X|^a / max|W|^(1 - a)``.

    Args:
        act_absmax: ``[channels]``, the largest ``|x|`` of each input channel.
        weight_absmax: ``[channels]``, the largest ``|w|`` of each input column over the
            balance layers.
        strength: ``a`` in ``[0, 1]``: how much of the activations' range moves to the weights.

    Returns:
        ``s`` in float32, at least ``MIN_SCALE``.
    """
    act = act_absmax.float().clamp(min=MIN_SCALE)
    weight = weight_absmax.float().clamp(min=MIN_SCALE)
    return (act.pow(strength) / weight.pow(1 - strength)).clamp(min=MIN_SCALE)


class SmoothQuantModifier(SmoothingModifier):
    """SmoothQuant: divide each input channel of the balance layers by
    ``s = max|X|^a / max|W|^(1 - a)`` (folded into the layer producing it) and multiply their
    weight columns by ``s``, so int8 activations lose their outlier channels.

    ``max|X|`` is the largest input magnitude of each channel over the calibration tokens (the
    maximum over ranks), ``max|W|`` the largest weight magnitude of each input column over the
    balance layers. Follow it with a quantization modifier (``QuantizationModifier`` or
    ``GPTQModifier`` with ``W8A8``); both run in the same calibration pass. The mappings are
    found on each block (see :class:`~lightning_compress.modifiers.smoothing.base.
    SmoothingModifier`).

    Args:
        smoothing_strength: ``a`` in ``[0, 1]``.
        mappings: explicit mappings instead of finding them (see ``SmoothingModifier``).
        targets: the linear layers that may be smooth or balance layers.
        ignore: layers never smoothed.
        start: -1: one-shot.
    """

    smoothing_strength: float = 0.5

    statistic_kind = "max"

    def validate(self) -> None:
        if not 0 <= self.smoothing_strength <= 1:
            self.fail("smoothing_strength", "a float in [0, 1]")
        super().validate()

    def compute_scale(self, mapping: SmoothingMapping) -> Tensor:
        """SmoothQuant's scale for one mapping (see :func:`smoothquant_scale`).

        Args:
            mapping: the layers.

        Returns:
            ``s``, ``[channels]``.
        """
        act = self._statistic.magnitude(mapping.named_balances)
        weights = [linear_weight(layer).detach().abs().amax(dim=0) for layer in mapping.balances]
        weight = torch.stack([w.to(act) for w in weights]).amax(dim=0)
        return smoothquant_scale(act, weight, self.smoothing_strength)
