"""A small pretrained Llama-style model, its byte tokenizer and text, for quickstarts and tests."""

from lightning_compress.bundled.evaluate import causal_lm_logits, perplexity
from lightning_compress.bundled.loading import (
    bundled_text,
    load_bundled_model,
    load_tokenizer,
    split_text,
    token_windows,
)
from lightning_compress.bundled.model import DecoderLayer, RMSNorm, TinyDecoder, TinyDecoderConfig
from lightning_compress.bundled.tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "DecoderLayer",
    "RMSNorm",
    "TinyDecoder",
    "TinyDecoderConfig",
    "bundled_text",
    "causal_lm_logits",
    "load_bundled_model",
    "load_tokenizer",
    "perplexity",
    "split_text",
    "token_windows",
]
