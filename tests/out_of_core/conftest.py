"""Tiny transformers decoders saved to disk, the inputs of the out-of-core tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from loguru import logger

from lightning_compress.lightning.out_of_core_choice import CHOICES_VARIABLE

transformers = pytest.importorskip("transformers")

LLAMA = {
    "vocab_size": 128,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


@pytest.fixture
def saved_llama(tmp_path: Path) -> Callable[..., Path]:
    """Saves a tiny random Llama (safetensors) and returns its directory.

    The function takes ``dtype`` (default bfloat16), ``tie`` (tied embeddings) and config
    overrides.
    """

    def save(dtype: torch.dtype = torch.bfloat16, tie: bool = False, **overrides) -> Path:
        config = transformers.LlamaConfig(**{**LLAMA, **overrides}, tie_word_embeddings=tie)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config).to(dtype)
        directory = tmp_path / f"llama-{str(dtype).removeprefix('torch.')}-{tie}"
        model.save_pretrained(directory)
        return directory

    return save


@pytest.fixture(autouse=True)
def no_inherited_choices(monkeypatch) -> None:
    """Each test starts without the ``out_of_core="auto"`` choices of an earlier one in the
    environment (and leaves none behind)."""
    monkeypatch.delenv(CHOICES_VARIABLE, raising=False)


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """The library's log messages (INFO and above) while the test runs."""
    collected: list[str] = []
    sink = logger.add(lambda message: collected.append(message.record["message"]), level="INFO")
    yield collected
    logger.remove(sink)
