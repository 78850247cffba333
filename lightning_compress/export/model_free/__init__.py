"""The model-free path: a data-free recipe applied to a checkpoint directory shard by shard,
without building the model in memory (see :func:`model_free_compress`)."""

from lightning_compress.export.model_free.compress import model_free_compress

__all__ = ["model_free_compress"]
