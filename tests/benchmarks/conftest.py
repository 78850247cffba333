"""What the tests of the benchmark scripts share: importing a script as it runs, and a small
Llama with random weights."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmark_script(monkeypatch) -> Callable[[str], ModuleType]:
    """Imports a script of ``benchmarks/`` by module name, with ``benchmarks/`` on the path
    (as when the script runs, so its imports of its sibling modules resolve)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


@pytest.fixture
def random_llama() -> Callable[..., nn.Module]:
    """Builds a Llama causal LM with a 64-token vocabulary, tied embeddings and random weights
    (seed 0), in eval mode; its other config fields are the keyword arguments given."""

    def build(**config: int) -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        llama = LlamaConfig(vocab_size=64, tie_word_embeddings=True, **config)
        return LlamaForCausalLM(llama).eval()

    return build
