"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch
from helpers import TwoLayer


@pytest.fixture
def model() -> TwoLayer:
    torch.manual_seed(0)
    return TwoLayer()
