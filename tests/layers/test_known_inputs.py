"""Declared inputs: per context, innermost first, gone after the body (also on errors)."""

from __future__ import annotations

import threading

import pytest
import torch
from greenlet import greenlet
from torch import nn

from lightning_compress.layers.known_inputs import inputs_known_ahead, known_inputs


def test_a_declaration_holds_for_its_body_and_an_inner_one_replaces_it():
    first, second = nn.Linear(2, 2), nn.Linear(2, 2)
    x, y = torch.ones(1, 2), torch.zeros(1, 2)
    assert known_inputs() is None
    with inputs_known_ahead([(first, x), (second, y)]):
        outer = known_inputs()
        assert outer[id(first)] is x and outer[id(second)] is y
        with inputs_known_ahead([(second, x)]):
            assert dict(known_inputs()) == {id(second): x}
        assert known_inputs() is outer
    assert known_inputs() is None


def test_a_declaration_ends_when_its_body_raises():
    layer = nn.Linear(2, 2)
    with pytest.raises(RuntimeError, match="boom"), inputs_known_ahead([(layer, torch.ones(2))]):
        raise RuntimeError("boom")
    assert known_inputs() is None


def test_greenlets_and_threads_do_not_see_each_others_declarations():
    layer = nn.Linear(2, 2)
    seen = {}

    def look(key: str) -> None:
        seen[key] = known_inputs()

    with inputs_known_ahead([(layer, torch.ones(2))]):
        greenlet(lambda: look("greenlet")).switch()
        thread = threading.Thread(target=look, args=("thread",))
        thread.start()
        thread.join()
        look("here")
    assert seen["greenlet"] is None and seen["thread"] is None
    assert id(layer) in seen["here"]
