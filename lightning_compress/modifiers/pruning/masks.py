"""Mask selection, shared by every pruning method: unstructured, N:M and global.

A mask is a bool tensor shaped like the scores: True keeps a weight, False prunes it.
Ties are broken the same way everywhere: among equal scores, the one with the lower
(flattened) index is pruned first, so every process and every run selects the same mask.

The layout helpers ``full_tensor`` and ``like_weight`` let the same selection run on
weights sharded as ``DTensor`` (FSDP2): select on the full tensor so that all ranks agree,
then shard the mask exactly like the weight so that ``weight.mul_(mask)`` stays shard-local.
``MaskStructureSetting`` gives pruning modifiers their ``mask_structure`` and its checks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from lightning_compress.recipe.errors import RecipeError

__all__ = [
    "MASK_STRUCTURE_EXPECTED",
    "MaskStructureSetting",
    "full_tensor",
    "global_masks",
    "like_weight",
    "nm_mask",
    "nm_mask_of_run",
    "parse_mask_structure",
    "row_mask",
    "unstructured_mask",
]

SELECT_FROM = 16
"""Groups of at least this many scores (e.g. Wanda's whole rows) are selected, not sorted."""
MASK_STRUCTURE_EXPECTED = "'N:M' with 0 < N < M (e.g. '2:4': 2 kept of every 4), or '0:0'"


def unstructured_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune exactly ``round(sparsity * numel)`` of the smallest scores.

    Args:
        scores: importance of each weight (e.g. ``|W|``), any shape.
        sparsity: the fraction to prune, in [0, 1].

    Returns:
        A bool mask shaped like ``scores``; False marks a pruned weight.

    Raises:
        ValueError: if ``sparsity`` is outside [0, 1].
    """
    _check_sparsity(sparsity)
    flat = scores.reshape(-1)
    num_pruned = round(sparsity * flat.numel())
    if num_pruned == 0:
        return torch.ones_like(scores, dtype=torch.bool)
    # A selection instead of a sort; ties at the threshold go lowest index first, as a
    # stable sort would order them.
    threshold = flat.kthvalue(num_pruned).values
    mask = flat > threshold
    tied = (flat == threshold).nonzero().flatten()
    mask[tied[num_pruned - int((flat < threshold).sum()) :]] = True
    return mask.view(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int, layer: str | None = None) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` consecutive input columns.

    Args:
        scores: importance of each weight, shaped ``[out_features, in_features]``.
        n: weights kept per group.
        m: group size along the input dimension (``in_features`` must be a multiple).
        layer: the layer's name, for error messages.

    Returns:
        A bool mask shaped like ``scores`` with exactly ``n`` True values per group.

    Raises:
        ValueError: unless ``0 < n < m``, ``scores`` is 2-D and ``m`` divides its columns.
    """
    where = f"layer '{layer}'" if layer else "scores"
    if not 0 < n < m:
        raise ValueError(f"N:M mask: expected 0 < N < M, got N={n}, M={m}")
    if scores.dim() != 2 or scores.shape[1] % m:
        raise ValueError(
            f"N:M mask {n}:{m}: {where} has shape {tuple(scores.shape)}; expected a 2-D "
            f"[out_features, in_features] weight with in_features divisible by {m}"
        )
    groups = scores.reshape(scores.shape[0], -1, m)
    if m >= SELECT_FROM:
        return _keep_largest(groups, n).view(scores.shape)
    order = torch.sort(groups, dim=-1, stable=True).indices
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(-1, order[..., : m - n], False)
    return mask.view(scores.shape)


def row_mask(
    scores: torch.Tensor,
    sparsity: float,
    mask_structure: tuple[int, int] | None = None,
    layer: str | None = None,
) -> torch.Tensor:
    """Prune each row of ``[out, in]`` scores on its own: its lowest ``sparsity``, or N:M.

    Unstructured, each row prunes its ``round(sparsity * in)`` lowest scores; N:M, each row
    keeps the ``n`` highest of every ``m`` consecutive columns. Ties prune the lower column
    first.

    Args:
        scores: ``[out, in]`` importance of each weight.
        sparsity: the fraction of each row to prune, in [0, 1] (unstructured only).
        mask_structure: ``(n, m)`` to keep ``n`` of every ``m`` columns; None: unstructured.
        layer: the layer's name, for error messages.

    Returns:
        A bool mask shaped like ``scores``: True keeps a weight.

    Raises:
        ValueError: when ``m`` does not divide ``in``.
    """
    if mask_structure is not None:
        return nm_mask(scores, *mask_structure, layer=layer)
    width = scores.shape[-1]
    pruned = round(sparsity * width)
    if pruned in (0, width):
        return torch.full_like(scores, pruned == 0, dtype=torch.bool)
    # a row is one N:M group with M = in_features
    return nm_mask(scores, width - pruned, width, layer=layer)


def _keep_largest(groups: torch.Tensor, n: int, dim: int = -1) -> torch.Tensor:
    """Keeps the ``n`` largest scores along ``dim``, by selection instead of a sort: below
    the ``(m - n)``-th smallest everything is pruned, and of the scores equal to it the
    lowest indices, as many as are still to prune."""
    num_pruned = groups.shape[dim] - n
    threshold = groups.kthvalue(num_pruned, dim=dim, keepdim=True).values
    below = groups < threshold
    tied = groups == threshold
    room = num_pruned - below.sum(dim=dim, keepdim=True)
    pruned = below.logical_or_(tied.logical_and_(tied.cumsum(dim=dim) <= room))
    return pruned.logical_not_()


def nm_mask_of_run(scores: torch.Tensor, n: int) -> torch.Tensor:
    """:func:`nm_mask` of one run of ``m`` columns, given transposed: ``[m, out_features]``.

    For the column-by-column sweep of SparseGPT, which holds columns as rows and selects
    one run at a time: the same mask (ties too), by selection along the run instead of a
    sort.

    Args:
        scores: ``[m, out_features]``; row ``i`` holds the scores of column ``i`` of the run.
        n: weights kept per row of the weight, ``0 < n < m``.

    Returns:
        A bool mask shaped like ``scores`` with exactly ``n`` True values per column.

    Raises:
        ValueError: unless ``0 < n < m``.
    """
    m = scores.shape[0]
    if not 0 < n < m:
        raise ValueError(f"N:M mask: expected 0 < N < M, got N={n}, M={m}")
    return _keep_largest(scores, n, dim=0)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Prune the smallest ``round(sparsity * total)`` scores across all layers together.

    One threshold for every layer: layers with small scores lose more weights. Ties are
    broken by the order of ``scores`` and then by index within a layer.

    Args:
        scores: importance of each layer's weights, by layer name.
        sparsity: the fraction of all weights to prune, in [0, 1].

    Returns:
        A bool mask per layer, shaped like its scores.

    Raises:
        ValueError: if ``sparsity`` is outside [0, 1].
    """
    if not scores:
        return {}
    flat = torch.cat([value.reshape(-1) for value in scores.values()])
    chunks = unstructured_mask(flat, sparsity).split([value.numel() for value in scores.values()])
    return {
        name: chunk.view(value.shape)
        for (name, value), chunk in zip(scores.items(), chunks, strict=True)
    }


def parse_mask_structure(mask_structure: str) -> tuple[int, int] | None:
    """Read a mask structure such as ``"2:4"``.

    Args:
        mask_structure: ``"N:M"`` (keep N of every M input columns) or ``"0:0"``.

    Returns:
        ``(n, m)``, or None for ``"0:0"`` (unstructured).

    Raises:
        ValueError: if the text is not ``"0:0"`` or ``"N:M"`` with ``0 < N < M``.
    """
    parts = str(mask_structure).split(":")
    if len(parts) == 2 and all(part.strip().isdigit() for part in parts):
        n, m = (int(part) for part in parts)
        if (n, m) == (0, 0):
            return None
        if 0 < n < m:
            return n, m
    raise ValueError(f"mask_structure: expected {MASK_STRUCTURE_EXPECTED}, got {mask_structure!r}")


class MaskStructureSetting:
    """The ``mask_structure`` setting of a pruning modifier, and the checks N:M needs.

    A mixin for :class:`~lightning_compress.modifiers.base.Modifier` subclasses, which declare
    the field themselves (``mask_structure: str = "0:0"``): ``"0:0"`` (unstructured) or
    ``"N:M"`` (keep N of every M consecutive input columns in each row).
    """

    mask_structure: str

    @property
    def structure(self) -> tuple[int, int] | None:
        """``(n, m)`` of an N:M ``mask_structure``, None when unstructured."""
        return parse_mask_structure(self.mask_structure)

    def check_mask_structure(self, sparsity_field: str) -> None:
        """Refuses a malformed ``mask_structure``, and N:M with a sparsity other than ``1 - N/M``.

        Call it from ``validate``.

        Args:
            sparsity_field: the field holding the sparsity that N:M must reach.

        Raises:
            RecipeError: naming ``mask_structure`` or ``sparsity_field``.
        """
        try:
            structure = self.structure
        except ValueError:
            self.fail("mask_structure", MASK_STRUCTURE_EXPECTED)
        if structure is not None:
            n, m = structure
            if not math.isclose(getattr(self, sparsity_field), 1 - n / m):
                expected = f"{1 - n / m:g} (= 1 - N/M for mask_structure {self.mask_structure!r})"
                self.fail(sparsity_field, expected)

    def check_widths(self, in_features: Mapping[str, int]) -> None:
        """Refuses N:M on layers whose ``in_features`` is not a multiple of M.

        Args:
            in_features: the input width of each targeted layer, by name.

        Raises:
            RecipeError: naming every such layer.
        """
        if self.structure is None:
            return
        m = self.structure[1]
        bad = [f"{name} (in_features={width})" for name, width in in_features.items() if width % m]
        if bad:
            raise RecipeError(
                f"{type(self).__name__}.mask_structure: {self.mask_structure!r} needs "
                f"in_features divisible by {m}, but {bad} are not; expected such layers only "
                "(add the others to ignore)"
            )


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every rank for a ``DTensor``, else ``tensor`` itself.

    Args:
        tensor: a plain tensor or a ``DTensor``.

    Returns:
        A plain tensor with the global shape.
    """
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def like_weight(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Lay a full mask out like ``weight``: same device, and same sharding for a ``DTensor``.

    Every rank must hold the same full ``mask``; each keeps its own shard without
    communicating.

    Args:
        mask: the full mask (plain tensor, global shape).
        weight: the weight it masks.

    Returns:
        The mask as a ``DTensor`` with the weight's mesh and placements, or as a plain
        tensor on the weight's device.
    """
    if isinstance(weight, DTensor):
        return distribute_tensor(mask, weight.device_mesh, weight.placements, src_data_rank=None)
    return mask.to(weight.device)


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity: expected a float in [0, 1], got {sparsity!r}")
