"""The error of the export: a model, layer, directory or checkpoint it cannot handle."""

__all__ = ["ExportError"]


class ExportError(ValueError):
    """A model, layer or output directory ``save_compressed`` refuses, or a checkpoint
    ``load_compressed`` cannot read.

    The message names what is wrong (the layer and its scheme, the path) and what to do.
    """
