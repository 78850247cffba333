"""Mappings: found from structure and data on every architecture; given ones are checked."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from modifiers.smoothing.models import (
    ARCHITECTURES,
    VOCAB,
    build,
    calibrate,
    expected_mappings,
    llama_like,
    logits,
    tiny_decoder,
    token_batches,
)
from torch import nn

from lightning_compress.modifiers.smoothing import (
    AWQModifier,
    SmoothingMapping,
    SmoothQuantModifier,
)
from lightning_compress.modifiers.smoothing.folding import apply_smoothing
from lightning_compress.recipe import RecipeError

W4_G32 = {"num_bits": 4, "strategy": "group", "group_size": 32}
QKV = ["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
@pytest.mark.parametrize(
    "modifier",
    [
        lambda: SmoothQuantModifier(smoothing_strength=0.8, ignore=["lm_head"]),
        lambda: AWQModifier(weights=W4_G32, ignore=["lm_head"]),
    ],
    ids=["smoothquant", "awq"],
)
def test_mappings_are_found_and_the_model_computes_the_same(name, modifier):
    model = build(name)
    original = copy.deepcopy(model)
    (smoother,) = calibrate(model, [modifier()])
    assert smoother.smoothed == expected_mappings(name)
    ids = token_batches(1, seed=7)[0]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=1e-4, atol=1e-5)
    changed = [
        key
        for key, value in model.state_dict().items()
        if not torch.equal(value, original.state_dict()[key])
    ]
    assert "model.layers.0.mlp.down_proj.weight" in changed or name == "opt"
    assert not any(key.startswith(("lm_head", "model.embed")) for key in changed)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == 0


def test_gpt2_conv1d_layers_are_smoothed():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    original = copy.deepcopy(model)
    (smoother,) = calibrate(model, [SmoothQuantModifier(targets=["Conv1D"])])
    # c_attn is q/k/v fused (three times wider than c_proj reads); c_fc -> c_proj passes GELU
    assert smoother.smoothed == [
        (f"transformer.h.{index}.{norm}", (f"transformer.h.{index}.{layer}",))
        for index in range(2)
        for norm, layer in [("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc")]
    ]
    ids = token_batches(1, seed=7)[0]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=1e-4, atol=1e-5)


def test_folding_between_linear_layers_is_exact():
    first, second = nn.Linear(6, 5), nn.Linear(5, 3)
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(0))
    expected = second(first(x))
    mapping = SmoothingMapping("first", first, ("second",), (second,))
    apply_smoothing(mapping, torch.linspace(0.5, 3.0, 5))
    torch.testing.assert_close(second(first(x)), expected, rtol=1e-5, atol=1e-6)


def test_the_basic_pipeline_treats_the_whole_model_as_one_block():
    model = build("llama")
    original = copy.deepcopy(model)
    (smoother,) = calibrate(model, [SmoothQuantModifier()], pipeline="basic")
    # the final norm feeds lm_head directly (not tied here): a mapping too
    assert smoother.smoothed == [*expected_mappings("llama"), ("model.norm", ("lm_head",))]
    ids = token_batches(1, seed=7)[0]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=1e-4, atol=1e-5)


def test_a_mapping_into_a_tied_weight_is_dropped():
    model = llama_like("Llama", 4)().eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    original = copy.deepcopy(model)
    (smoother,) = calibrate(model, [SmoothQuantModifier()], pipeline="basic")
    assert ("model.norm", ("lm_head",)) not in smoother.smoothed
    assert len(smoother.smoothed) == 8
    ids = token_batches(1, seed=7)[0]
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=1e-4, atol=1e-5)


def test_given_mappings_are_used_as_given():
    model = tiny_decoder(kv_heads=4)
    mappings = [
        [QKV, "re:.*input_layernorm"],
        {"balance_layers": ["re:.*o_proj"], "smooth_layer": "re:.*v_proj"},
    ]
    (smoother,) = calibrate(model, [SmoothQuantModifier(mappings=mappings)])
    assert [smooth.split(".")[-1] for smooth, _ in smoother.smoothed] == [
        "input_layernorm",
        "v_proj",
    ] * 2


# ----------------------------------------------------------------- bad mappings
def assert_untouched_after(error: str, model, **settings) -> None:
    original = copy.deepcopy(model)
    with pytest.raises(RecipeError, match=error):
        calibrate(model, [SmoothQuantModifier(**settings)])
    for key, value in model.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key


def test_a_mapping_through_a_nonlinearity_is_refused_naming_the_layers():
    mapping = [["re:.*down_proj"], "re:.*gate_proj"]
    error = (
        r"'model.layers.0.mlp.down_proj' does not receive the output channels of "
        r"'model.layers.0.mlp.gate_proj' linearly.*non-linear function"
    )
    assert_untouched_after(error, tiny_decoder(), mappings=[mapping])


def test_a_mapping_through_relu_is_refused():
    mapping = [["re:.*fc2"], "re:.*fc1"]
    error = "'model.decoder.layers.0.fc2' does not receive the output channels"
    assert_untouched_after(error, build("opt"), mappings=[mapping])


def test_a_mapping_missing_a_reader_is_refused():
    mapping = [["re:.*q_proj", "re:.*k_proj"], "re:.*input_layernorm"]
    error = (
        r"smoothing 'model.layers.0.input_layernorm' into \['model.layers.0.self_attn.q_proj', "
        r"'model.layers.0.self_attn.k_proj'\] changes the output of block 'model.layers.0'"
    )
    assert_untouched_after(error, tiny_decoder(), mappings=[mapping])


@pytest.mark.parametrize(
    ("mappings", "ignore", "error"),
    [
        ([["re:.*q_proj"]], [], r"mappings\[0\]: expected \[\[balance layer patterns\]"),
        ([[QKV, "re:.*nothing"]], [], r"mappings\[0\]: 're:.\*nothing' matches no module"),
        (
            [[["re:.*post_attention_layernorm"], "re:.*input_layernorm"]],
            [],
            r"balance layer 'model.layers.0.post_attention_layernorm' \(RMSNorm\) is not linear",
        ),
        (
            [[QKV, "re:.*input_layernorm"]],
            ["re:.*k_proj"],
            r"balance layer 'model.layers.0.self_attn.k_proj' \(Linear\) is in ignore",
        ),
        ([[QKV, "re:.*self_attn$"]], [], r"smooth layer 'model.layers.0.self_attn' is a"),
        ([[["re:.*down_proj"], "re:.*q_proj"]], [], "has 128 input channels but smooth layer"),
    ],
)
def test_malformed_mappings_are_refused_before_the_model_changes(mappings, ignore, error):
    assert_untouched_after(error, tiny_decoder(), mappings=mappings, ignore=ignore)


def test_a_block_without_any_mapping_is_an_error_naming_it():
    ignore = ["re:.*layernorm", "re:.*up_proj", "lm_head"]
    error = r"no smoothing mapping in block 'model.layers.0' \(layers \['model.layers.0"
    assert_untouched_after(error, tiny_decoder(), ignore=ignore)
