"""Layer adapters: every weight matrix of a model reachable as an ``nn.Linear`` layer.

Importing the package registers the project's adapters (each module registers its own).
"""

from lightning_compress.layers import conv1d, experts
from lightning_compress.layers.experts import LinearExperts, calibrating_all_experts
from lightning_compress.layers.linearize import (
    ADAPTERS,
    LayerAdapter,
    Linearization,
    linearize,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "LayerAdapter",
    "LinearExperts",
    "Linearization",
    "calibrating_all_experts",
    "conv1d",
    "experts",
    "linearize",
    "register_adapter",
]
