"""A tiny transformers checkpoint and data files on disk, for the command-line tests."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from loguru import logger
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress.bundled.tokenizer import byte_tokenizer_fast
from lightning_compress.core.verbosity import set_verbosity

ARCHITECTURE = {
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "vocab_size": 256,  # the byte tokenizer's
}
RECORDS = [
    "It is a truth universally acknowledged, that a single man in possession",
    "of a good fortune, must be in want of a wife. However little known the feelings",
    "or views of such a man may be on his first entering a neighbourhood, this truth",
    "is so well fixed in the minds of the surrounding families, that he is considered",
    "the rightful property of some one or other of their daughters.",
]


def save_checkpoint(directory: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A 2-layer Llama with random weights and a byte-level tokenizer, saved to ``directory``."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURE)).to(dtype).eval()
    model.save_pretrained(directory)
    byte_tokenizer_fast().save_pretrained(directory)
    return directory


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    """One JSON record per line, its text in ``column``."""
    path.write_text("".join(json.dumps({column: text}) + "\n" for text in texts))
    return path


@pytest.fixture(autouse=True)
def log_settings_restored():
    """Commands set the process's verbosity and loguru sinks: the defaults come back after."""
    yield
    set_verbosity("info")
    logger.remove()
    logger.add(sys.stderr)
