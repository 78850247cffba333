"""Which AWQ mappings of a block may be searched before any of them is applied (under DDP
their searches are then shared among the ranks)."""

from __future__ import annotations

from torch import nn

from lightning_compress.modifiers.smoothing.awq import independent_searches
from lightning_compress.modifiers.smoothing.folding import SmoothingMapping


def mapping(smooth: str, *balances: str, passengers: tuple[str, ...] = ()) -> SmoothingMapping:
    layer = nn.Linear(2, 2)
    return SmoothingMapping(
        smooth, layer, balances, (layer,) * len(balances), passengers, (layer,) * len(passengers)
    )


def test_a_llama_block_s_mappings_are_independent():
    block = [
        mapping("input_layernorm", "q_proj", "k_proj", "v_proj"),
        mapping("v_proj", "o_proj"),
        mapping("post_attention_layernorm", "gate_proj", "up_proj"),
        mapping("up_proj", "down_proj"),
    ]
    assert independent_searches(block)


def test_a_search_reading_a_layer_an_earlier_mapping_changes_is_not():
    assert independent_searches([mapping("v_proj", "o_proj"), mapping("o_proj", "x_proj")])
    assert not independent_searches([mapping("norm", "q_proj"), mapping("v_proj", "q_proj")])
    assert not independent_searches([mapping("up_proj", "down_proj"), mapping("norm", "up_proj")])
    routed = mapping("norm", "gate_proj", passengers=("router",))
    assert not independent_searches([routed, mapping("norm_2", "router")])
