"""Layers that vLLM runs as one fused matrix, and so must share a per-tensor global scale.

vLLM loads ``q_proj``/``k_proj``/``v_proj`` into one ``qkv_proj`` and ``gate_proj``/``up_proj``
(``w1``/``w3`` in Mixtral's experts) into one ``gate_up_proj`` and applies a single global
scale to the fused matrix (NVFP4: the largest of the stored ones), so siblings quantized with
different global scales would be served with the wrong one.
"""

from __future__ import annotations

__all__ = ["FUSED_SIBLINGS", "fused_groups"]

FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))
"""Names of the sibling layers (children of one module) that vLLM fuses."""


def fused_groups(names: list[str]) -> list[list[str]]:
    """Groups layer names into the sets vLLM fuses; every other layer is alone.

    Args:
        names: dotted layer names.

    Returns:
        The groups, in the order of their first layer, covering ``names``.
    """
    groups: dict[tuple[str, int], list[str]] = {}
    ordered: list[list[str]] = []
    for name in names:
        parent, _, leaf = name.rpartition(".")
        kind = next((i for i, siblings in enumerate(FUSED_SIBLINGS) if leaf in siblings), None)
        if kind is None:
            ordered.append([name])
            continue
        if (parent, kind) not in groups:
            groups[parent, kind] = []
            ordered.append(groups[parent, kind])
        groups[parent, kind].append(name)
    return ordered
