"""Export to (and import from) the compressed-tensors checkpoint format.

``save_compressed`` writes what transformers' ``AutoModelForCausalLM.from_pretrained`` and
vLLM load (``StreamingCheckpoint`` writes the same block by block, resumably);
``load_compressed`` reads such a checkpoint back as a model this project can run, compress
further or fine-tune. Needs the ``hf`` extra: ``pip install "lightning-compress[hf]"``.
"""

try:
    import compressed_tensors  # noqa: F401
    import transformers  # noqa: F401
except ImportError as err:
    raise ImportError(
        f"lightning_compress.export needs the 'hf' extra ({err.name} is missing): "
        'pip install "lightning-compress[hf]"'
    ) from err

from lightning_compress.export.errors import ExportError
from lightning_compress.export.load import load_compressed
from lightning_compress.export.manifest import checkpoint_fingerprint
from lightning_compress.export.model_free import model_free_compress
from lightning_compress.export.save import save_compressed
from lightning_compress.export.streaming import StreamingCheckpoint
from lightning_compress.export.tokenizer import check_tokenizer
from lightning_compress.export.writer import check_output_dir

__all__ = [
    "ExportError",
    "StreamingCheckpoint",
    "check_output_dir",
    "checkpoint_fingerprint",
    "check_tokenizer",
    "load_compressed",
    "model_free_compress",
    "save_compressed",
]
