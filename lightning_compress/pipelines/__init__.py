"""Calibration pipelines (sequential, basic, data-free), the activation cache, and the
helpers modifiers call to reduce statistics across ranks. Never imports lightning."""

from lightning_compress.core.compression_record import PartialCompression, partial_compression
from lightning_compress.pipelines.base import (
    BlockReport,
    CalibrationPipeline,
    PipelineOptions,
    WeightResidency,
    placed_on,
)
from lightning_compress.pipelines.basic import BasicPipeline
from lightning_compress.pipelines.blocks import find_blocks, hidden_states_of
from lightning_compress.pipelines.cache import ActivationCache
from lightning_compress.pipelines.capture import (
    BlockInputs,
    call_model,
    capture_block_inputs,
    input_device,
)
from lightning_compress.pipelines.data_free import DataFreePipeline
from lightning_compress.pipelines.registry import (
    PIPELINES,
    check_pipeline_name,
    create_pipeline,
    resolve_pipeline,
)
from lightning_compress.pipelines.sequential import SequentialPipeline

__all__ = [
    "PIPELINES",
    "ActivationCache",
    "BasicPipeline",
    "BlockInputs",
    "BlockReport",
    "CalibrationPipeline",
    "DataFreePipeline",
    "PartialCompression",
    "PipelineOptions",
    "SequentialPipeline",
    "WeightResidency",
    "call_model",
    "capture_block_inputs",
    "check_pipeline_name",
    "create_pipeline",
    "find_blocks",
    "hidden_states_of",
    "input_device",
    "partial_compression",
    "placed_on",
    "resolve_pipeline",
]
