"""The pipelines by name, and the choice ``pipeline="auto"`` makes."""

from __future__ import annotations

from loguru import logger
from torch import nn

from lightning_compress.core import CompressionSession
from lightning_compress.pipelines.base import CalibrationPipeline, PipelineOptions
from lightning_compress.pipelines.basic import BasicPipeline
from lightning_compress.pipelines.blocks import find_blocks
from lightning_compress.pipelines.data_free import DataFreePipeline
from lightning_compress.pipelines.sequential import SequentialPipeline

__all__ = ["PIPELINES", "check_pipeline_name", "create_pipeline", "resolve_pipeline"]

PIPELINES: dict[str, type[CalibrationPipeline]] = {
    cls.name: cls for cls in (SequentialPipeline, BasicPipeline, DataFreePipeline)
}


def check_pipeline_name(name: str) -> None:
    """Refuse a pipeline name that is neither ``auto`` nor registered.

    Args:
        name: the name.

    Raises:
        ValueError: for an unknown name; the message lists the known ones.
    """
    if name != "auto" and name not in PIPELINES:
        raise ValueError(f"pipeline={name!r} is not known; expected one of auto, {list(PIPELINES)}")


def resolve_pipeline(
    name: str, model: nn.Module, has_data: bool, sequential_targets: list[str] | None = None
) -> str:
    """The pipeline to run: ``name`` itself, or what ``"auto"`` picks.

    ``auto`` picks ``data_free`` without data, ``sequential`` when the model has repeated
    blocks, else ``basic`` (with a warning saying why).

    Args:
        name: ``auto``, ``sequential``, ``basic`` or ``data_free``.
        model: the model.
        has_data: whether calibration data was given.
        sequential_targets: class names of the blocks, if given.

    Returns:
        The pipeline's name.

    Raises:
        ValueError: for an unknown name.
    """
    check_pipeline_name(name)
    if name != "auto":
        return name
    if not has_data:
        return DataFreePipeline.name
    if find_blocks(model, sequential_targets):
        return SequentialPipeline.name
    logger.warning(
        "no repeated blocks found; falling back to basic: {} has no nn.ModuleList of two or "
        "more modules of one class (pass sequential_targets to name its blocks)",
        type(model).__name__,
    )
    return BasicPipeline.name


def create_pipeline(
    name: str,
    model: nn.Module,
    session: CompressionSession,
    options: PipelineOptions,
    has_data: bool = True,
) -> CalibrationPipeline:
    """Build the pipeline ``name`` (or the one ``auto`` picks) for ``model``.

    Args:
        name: ``auto``, ``sequential``, ``basic`` or ``data_free``.
        model: the session's model.
        session: the initialized session.
        options: the pipeline settings.
        has_data: whether calibration data will be given.

    Returns:
        The pipeline.
    """
    resolved = resolve_pipeline(name, model, has_data, options.sequential_targets)
    return PIPELINES[resolved](model, session, options)
