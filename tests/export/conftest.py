"""Fixtures of the export tests: the helpers of ``export_models``.

Test modules cannot import this conftest by name (``tests/conftest.py`` shadows it), so the
helpers live in ``tests/export_models.py`` and are handed to tests here as fixtures.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from export_models import compressed, prune_2_4, tiny_model, token_ids, w4a16
from loguru import logger
from torch import nn

from lightning_compress.modifiers import QuantizationModifier


@pytest.fixture(name="tiny_model")
def tiny_model_fixture() -> Callable[..., nn.Module]:
    """:func:`tiny_model`."""
    return tiny_model


@pytest.fixture(name="compressed")
def compressed_fixture() -> Callable[[str, str], nn.Module]:
    """:func:`compressed`."""
    return compressed


@pytest.fixture(name="token_ids")
def token_ids_fixture() -> Callable[..., torch.Tensor]:
    """:func:`token_ids`."""
    return token_ids


@pytest.fixture(name="prune_2_4")
def prune_2_4_fixture() -> Callable[[nn.Module], None]:
    """:func:`prune_2_4`."""
    return prune_2_4


@pytest.fixture(name="w4a16")
def w4a16_fixture() -> Callable[..., QuantizationModifier]:
    """:func:`w4a16`."""
    return w4a16


@pytest.fixture(autouse=True)
def quiet_log():
    """The library logs per-layer metrics at DEBUG; keep test output readable."""
    logger.disable("lightning_compress")
    yield
    logger.enable("lightning_compress")
