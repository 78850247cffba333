"""``CompressionSummary``: what a compression run compressed, its size and its time."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from loguru import logger
from torch import nn

from lightning_compress.core.logger import LoggerManager
from lightning_compress.core.model_layer import module_matches
from lightning_compress.modifiers.pruning.structure import follows_2_4, is_pruned
from lightning_compress.modifiers.quantization.args import (
    PRESET_SCHEMES,
    ROLES,
    QuantizationArgs,
    QuantizationScheme,
)
from lightning_compress.modifiers.quantization.formats import format_of
from lightning_compress.pipelines.coverage import WeightCoverage, weight_coverage

__all__ = ["CompressionSummary", "parameter_bytes", "scheme_label", "sparsity_label"]

NAMED_LAYERS = 5
"""Layers left out are named when there are at most this many."""
SHAPE_FIELDS = (
    "num_bits",
    "type",
    "symmetric",
    "strategy",
    "group_size",
    "dynamic",
    "scale_dtype",
    "block_structure",
)
"""The fields of ``QuantizationArgs`` that decide how a tensor is stored."""


@dataclass
class CompressionSummary:
    """What a compression run did, for people: one short block of text (:meth:`format`).

    ``oneshot`` fills one in and logs it at INFO when it ends. Pass your own
    (``oneshot(..., summary=CompressionSummary())``) to read the numbers, or to add phases
    and quality measured around the call (``phases["load"]``, :meth:`set_quality`); then
    ``oneshot`` leaves logging it to you (:meth:`log`); left-out weights are warned about
    either way (:meth:`report_coverage`).

    Args:
        quantized: quantized linear layer names to their scheme's label (:func:`scheme_label`).
        sparse: pruned linear layer names (at least half of their weights zero, as the
            checkpoint's ``sparsity.json`` records them) to ``"2:4 sparse"`` or
            ``"unstructured sparse"``.
        ignored: uncompressed linear layers that an ``ignore`` pattern of the recipe names.
        left_out: uncompressed linear layers that no ``ignore`` pattern names.
        linear_layers: the number of linear layers of the model (and of other layers that
            carry a quantization scheme, counted with them).
        coverage: the weight tensors of the decoder blocks compressed, ignored and left
            out (see ``lightning_compress.pipelines.coverage``).
        size_before: the model's parameter bytes in its dtype, before compression.
        dtype: the dtype of most of those bytes.
        output_dir: where the checkpoint was saved, if it was.
        size_after: the bytes of the checkpoint's safetensors files on disk.
        phases: phase name (``load``, ``data``, ``compress``, ``save``) to seconds.
        quality_metric: what ``quality_before`` and ``quality_after`` measure.
        quality_before: the metric before compression.
        quality_after: the metric after compression.
    """

    quantized: dict[str, str] = field(default_factory=dict)
    sparse: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    left_out: list[str] = field(default_factory=list)
    linear_layers: int = 0
    coverage: WeightCoverage | None = None
    size_before: int | None = None
    dtype: str | None = None
    output_dir: Path | None = None
    size_after: int | None = None
    phases: dict[str, float] = field(default_factory=dict)
    quality_metric: str | None = None
    quality_before: float | None = None
    quality_after: float | None = None

    @property
    def schemes(self) -> dict[str, int]:
        """Each scheme's label (quantization, then sparsity) to its number of layers."""
        counts = Counter(self.quantized.values())
        counts.update(self.sparse.values())
        return dict(counts)

    def measure_before(self, model: nn.Module) -> None:
        """Records the size of ``model`` before it is compressed.

        Args:
            model: the model.
        """
        self.size_before, self.dtype = parameter_bytes(model)

    def describe(
        self,
        model: nn.Module,
        ignore: Iterable[str] = (),
        targeted: Iterable[str] = (),
        sequential_targets: Sequence[str] | None = None,
        written_labels: Mapping[str, str] | None = None,
    ) -> None:
        """Records the compressed, ignored and left-out linear layers of ``model``, and the
        coverage of its decoder blocks' weights.

        Args:
            model: the compressed model.
            ignore: the recipe's ``ignore`` patterns.
            targeted: the names of the layers the recipe targeted for compression.
            sequential_targets: class names of the decoder blocks (found by default).
            written_labels: how the layers whose weights were written out and are no
                longer in memory (on the meta device) are compressed where their modules do
                not show it (pruned: the ``sparsity_label``), by name.
        """
        ignore = list(ignore)
        self.quantized, self.sparse, self.ignored, self.left_out = {}, {}, [], []
        self.linear_layers = 0
        for name, module in model.named_modules():
            scheme = getattr(module, "quantization_scheme", None)
            quantized = isinstance(scheme, QuantizationScheme)
            if not (isinstance(module, nn.Linear) or quantized):
                continue
            self.linear_layers += 1
            if quantized:
                self.quantized[name] = scheme_label(scheme)
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.is_meta:
                label = (written_labels or {}).get(name)
            else:
                label = sparsity_label(weight)
            if label is not None:
                self.sparse[name] = label
            if name in self.quantized or name in self.sparse:
                continue
            if any(module_matches(name, module, pattern) for pattern in ignore):
                self.ignored.append(name)
            else:
                self.left_out.append(name)
        labels = {
            name: " + ".join(item for item in (self.quantized.get(name), label) if item)
            for name, label in self.sparse.items()
        }
        self.coverage = weight_coverage(
            model, {**self.quantized, **labels}, ignore, targeted, sequential_targets
        )

    def report_coverage(self, loggers: LoggerManager | None = None, log_line: bool = True) -> None:
        """Reports the coverage (after :meth:`describe`): a WARNING listing the left-out
        weights, its numbers to ``loggers`` under ``coverage/`` and, with ``log_line``, its
        line at INFO.

        Args:
            loggers: a session's loggers (inside a Trainer, they reach its loggers).
            log_line: log the coverage line (leave it to :meth:`log` otherwise).
        """
        if self.coverage is None:
            return
        if log_line:
            logger.opt(depth=1).info("compression coverage: {}", self.coverage.format())
        self.coverage.warn()
        if loggers is not None:
            loggers.log_scalars("coverage", self.coverage.metrics())

    def record_checkpoint(self, output_dir: str | Path) -> None:
        """Records the checkpoint saved in ``output_dir`` and the size of its weights on disk.

        Args:
            output_dir: the checkpoint directory.
        """
        self.output_dir = Path(output_dir)
        self.size_after = sum(path.stat().st_size for path in self.output_dir.glob("*.safetensors"))

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Adds the seconds spent inside the block to ``phases[name]``.

        Args:
            name: the phase.
        """
        begin = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - begin

    def set_quality(self, metric: str, before: float | None, after: float | None) -> None:
        """Records the quality before and after compression.

        Args:
            metric: what was measured, e.g. ``"perplexity"``.
            before: its value before compression.
            after: its value after.
        """
        self.quality_metric, self.quality_before, self.quality_after = metric, before, after

    def format(self) -> str:
        """The summary as a few lines of text."""
        lines = ["compression summary:"]
        compressed = len(self.quantized.keys() | self.sparse.keys())
        schemes = "; ".join(f"{label}: {count} layers" for label, count in self.schemes.items())
        lines.append(
            f"  compressed {compressed} of {self.linear_layers} linear layers"
            + (f" ({schemes})" if schemes else "")
        )
        lines.append(f"  ignored: {_names(self.ignored)}")
        lines.append(f"  left out (neither compressed nor ignored): {_names(self.left_out)}")
        if self.coverage is not None:
            lines.append(f"  weights of the {self.coverage.format()}")
        if self.size_before is not None or self.size_after is not None:
            lines.append(f"  size: {self._size()}")
        if self.phases:
            times = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.phases.items())
            lines.append(f"  time: {times} (total {sum(self.phases.values()):.1f} s)")
        if self.quality_metric is not None:
            lines.append(f"  {self.quality_metric}: {self._quality()}")
        return "\n".join(lines)

    def log(self) -> None:
        """Logs :meth:`format` at INFO."""
        logger.opt(depth=1).info("{}", self.format())

    def _size(self) -> str:
        before = (
            f"{_bytes(self.size_before)} of {self.dtype} parameters"
            if self.size_before is not None
            else "unknown"
        )
        if self.size_after is None:
            return f"{before} (not saved)"
        after = f"{_bytes(self.size_after)} of safetensors files in {self.output_dir}"
        ratio = (
            f", {self.size_before / self.size_after:.2f}x smaller"
            if self.size_before and self.size_after
            else ""
        )
        return f"{before} -> {after}{ratio}"

    def _quality(self) -> str:
        before, after = self.quality_before, self.quality_after
        change = f" ({(after - before) / before:+.1%})" if before and after is not None else ""
        return f"{_number(before)} before -> {_number(after)} after{change}"

    def __str__(self) -> str:
        return self.format()


def scheme_label(scheme: QuantizationScheme) -> str:
    """A short name for a quantization scheme, e.g. ``"W4A16 (int4 g128)"``.

    Args:
        scheme: the scheme.

    Returns:
        The preset's name when the scheme stores its tensors as a preset does (else
        ``W<bits>A<bits>``), then the weights' and activations' formats.
    """
    roles = {role: getattr(scheme, role) for role in ROLES if getattr(scheme, role) is not None}
    name = next(
        (
            preset
            for preset, preset_roles in PRESET_SCHEMES.items()
            if preset_roles.keys() == roles.keys()
            and all(_shape(preset_roles[role]) == _shape(roles[role]) for role in roles)
        ),
        None,
    )
    if name is None:
        weights, inputs = scheme.weights, scheme.input_activations
        name = f"W{weights.num_bits if weights else 16}A{inputs.num_bits if inputs else 16}"
    prefixes = {"weights": "", "input_activations": "act ", "output_activations": "out "}
    details = ", ".join(f"{prefixes[role]}{_args_label(args)}" for role, args in roles.items())
    return f"{name} ({details})"


def sparsity_label(weight: object) -> str | None:
    """How a layer's weight is pruned: ``2:4 sparse``, ``unstructured sparse``, or None.

    A weight sharded as ``DTensor`` (FSDP2) is judged whole, in a collective: every rank calls
    it (``describe`` runs on all ranks; report on rank zero).

    Args:
        weight: the layer's weight (anything else gives None).

    Returns:
        The label, or None when the weight is not a pruned tensor.
    """
    if not isinstance(weight, torch.Tensor) or not is_pruned(weight.detach()):
        return None
    return "2:4 sparse" if follows_2_4(weight.detach()) else "unstructured sparse"


def parameter_bytes(model: nn.Module) -> tuple[int, str]:
    """The bytes of ``model``'s parameters, each counted once (tied weights share one).

    Args:
        model: the model.

    Returns:
        The bytes, and the dtype holding most of them (e.g. ``"bfloat16"``).
    """
    per_dtype: Counter[str] = Counter()
    for parameter in model.parameters():  # a parameter shared by several modules comes once
        dtype = str(parameter.dtype).removeprefix("torch.")
        per_dtype[dtype] += parameter.numel() * parameter.element_size()
    dtype = per_dtype.most_common(1)[0][0] if per_dtype else "no"
    return sum(per_dtype.values()), dtype


def _shape(args: QuantizationArgs) -> tuple:
    return tuple(getattr(args, name) for name in SHAPE_FIELDS)


def _args_label(args: QuantizationArgs) -> str:
    values = f"{'int' if args.type == 'int' else 'fp'}{args.num_bits}"
    if args.scale_dtype is not None:  # the format's own name: nvfp4, mxfp4, mxfp8
        values = format_of(args.type, args.num_bits, args.scale_dtype).name
    grouped = args.strategy in ("group", "tensor_group")
    strategy = f"g{args.group_size}" if grouped else f"per-{args.strategy}"
    if args.block_structure is not None:
        strategy = "block " + "x".join(map(str, args.block_structure))
    parts = [values, "" if args.symmetric else "asym", strategy]
    parts.append("dynamic" if args.dynamic else "")
    return " ".join(part for part in parts if part)


def _names(names: list[str]) -> str:
    if not names:
        return "none"
    if len(names) <= NAMED_LAYERS:
        return f"{len(names)} ({', '.join(names)})"
    return f"{len(names)} (e.g. {', '.join(names[:3])})"


def _bytes(size: float) -> str:
    units = ("B", "KB", "MB", "GB", "TB")
    index = 0
    while size >= 1000 and index < len(units) - 1:
        size, index = size / 1000, index + 1
    return f"{size:.0f} B" if index == 0 else f"{size:.1f} {units[index]}"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
