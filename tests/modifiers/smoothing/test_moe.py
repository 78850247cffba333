"""SmoothQuant and AWQ on mixtures of experts (fused experts made per-expert Linear layers),
GPT-2 (Conv1D made Linear) and Falcon: every reader of a norm is smoothed, routers are rescaled
so the routing does not change, and the smoothed model computes the same function."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from architectures.tiny_models import ROUTERS, tiny_config, tiny_model, token_ids
from modifiers.smoothing.models import calibrate, logits
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_compress.layers import linearize
from lightning_compress.layers.experts import LinearExperts
from lightning_compress.modifiers import Modifier, QuantizationModifier
from lightning_compress.modifiers.smoothing import AWQModifier, SmoothQuantModifier
from lightning_compress.modifiers.smoothing.probe import BlockProbe
from lightning_compress.recipe import RecipeError

W4_G32 = {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}
MIXTURES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "granitemoe"]
FAST = {"mixtral", "qwen2_moe", "gpt_oss", "deepseek_v3"}
NO_UP_DOWN = {"gpt_oss"}  # its experts compute gate * sigmoid(gate) * (up + 1): not linear in up


def linearized(kind: str) -> nn.Module:
    model = tiny_model(kind)
    linearize(model)
    return model


def ignored(kind: str) -> list[str]:
    return ["lm_head", *ROUTERS.get(kind, [])]


def smooth(model: nn.Module, modifiers: list, all_experts: bool = True) -> list:
    batches = list(token_ids(4, 16).split(2))
    return calibrate(model, modifiers, batches, moe_calibrate_all_experts=all_experts)


def routers(model: nn.Module, kind: str) -> dict[str, nn.Module]:
    return {
        name: module
        for name, module in model.named_modules()
        if any(re.match(pattern.removeprefix("re:"), name) for pattern in ROUTERS[kind])
    }


def experts_of(model: nn.Module) -> dict[str, LinearExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LinearExperts)}


def assert_same_function(model: nn.Module, original: nn.Module) -> None:
    ids = token_ids(2, 16, seed=7)
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=1e-4, atol=1e-5)


def kinds(names: list[str]) -> list:
    return [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in names]


@pytest.mark.parametrize("kind", kinds(MIXTURES))
@pytest.mark.parametrize(
    "modifier",
    [
        lambda kind: SmoothQuantModifier(smoothing_strength=0.8, ignore=ignored(kind)),
        lambda kind: AWQModifier(weights=W4_G32, ignore=ignored(kind)),
    ],
    ids=["smoothquant", "awq"],
)
def test_every_expert_is_smoothed_and_the_router_rescaled_keeping_the_function(kind, modifier):
    model = linearized(kind)
    original = copy.deepcopy(model)
    (smoother,) = smooth(model, [modifier(kind)])
    smoothed = dict(smoother.smoothed)
    for name, experts in experts_of(model).items():
        block = name.rsplit(".", 2)[0]
        norm = f"{block}.post_attention_layernorm"
        scale = original.get_submodule(norm).weight / model.get_submodule(norm).weight
        for index, _ in enumerate(experts.experts()):
            prefix = f"{name}.{index}"
            assert {f"{prefix}.gate_proj", f"{prefix}.up_proj"} <= set(smoothed[norm])
            if kind not in NO_UP_DOWN:
                assert smoothed[f"{prefix}.up_proj"] == (f"{prefix}.down_proj",)
            gate = f"{prefix}.gate_proj"
            assert_scaled_columns(model, original, gate, scale)
        for router in routers(model, kind):
            if router.startswith(f"{block}."):
                assert_scaled_columns(model, original, router, scale)
    assert_same_function(model, original)


def assert_scaled_columns(model: nn.Module, original: nn.Module, name: str, scale) -> None:
    expected = original.get_submodule(name).weight * scale
    torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=1e-5, atol=1e-7)


def test_shared_experts_and_their_gate_read_the_norm_with_the_routed_experts():
    model = linearized("qwen2_moe")
    original = copy.deepcopy(model)
    (smoother,) = smooth(model, [SmoothQuantModifier(ignore=ignored("qwen2_moe"))])
    readers = dict(smoother.smoothed)["model.layers.0.post_attention_layernorm"]
    assert {
        "model.layers.0.mlp.shared_expert.gate_proj",
        "model.layers.0.mlp.shared_expert.up_proj",
    } <= set(readers)
    # the shared expert's gate is ignored: rescaled as a passenger, not a balance layer
    assert "model.layers.0.mlp.shared_expert_gate" not in readers
    gate = model.model.layers[0].mlp.shared_expert_gate.weight
    assert not torch.equal(gate, original.model.layers[0].mlp.shared_expert_gate.weight)
    assert_same_function(model, original)


def test_deepseek_mla_norms_smooth_their_projections():
    model = linearized("deepseek_v3")
    (smoother,) = smooth(model, [SmoothQuantModifier(ignore=ignored("deepseek_v3"))])
    attention = "model.layers.1.self_attn"
    assert (
        "model.layers.1.input_layernorm",
        (f"{attention}.q_a_proj", f"{attention}.kv_a_proj_with_mqa"),
    ) in smoother.smoothed
    assert (f"{attention}.q_a_layernorm", (f"{attention}.q_b_proj",)) in smoother.smoothed
    assert (f"{attention}.kv_a_layernorm", (f"{attention}.kv_b_proj",)) in smoother.smoothed


def test_an_expert_no_token_reached_is_smoothed_with_its_siblings():
    """Routed-only calibration with expert 3 never chosen: it still takes the norm's scale, so
    the model computes the same function once tokens reach it."""
    model = linearized("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.router.bias.data[3] = -1e4
    original = copy.deepcopy(model)
    (smoother,) = smooth(model, [SmoothQuantModifier(ignore=ignored("gpt_oss"))], all_experts=False)
    readers = dict(smoother.smoothed)["model.layers.0.post_attention_layernorm"]
    assert "model.layers.0.mlp.experts.3.gate_proj" in readers
    for copy_ in (model, original):
        for layer in copy_.model.layers:
            layer.mlp.router.bias.data[3] = 0.0
    assert_same_function(model, original)


@pytest.mark.parametrize("router", [[], ["re:.*mlp.gate$"]], ids=["router_added", "router_named"])
def test_the_reference_projects_moe_mappings_keep_the_routing(router):
    """llm-compressor's MoE mapping names the experts only; the router is added (or may be
    named) and rescaled, not compressed."""
    model = linearized("qwen3_moe")
    original = copy.deepcopy(model)
    experts = ["re:.*mlp.experts.*.gate_proj$", "re:.*mlp.experts.*.up_proj$"]
    mappings = [
        [["re:.*q_proj$", "re:.*k_proj$", "re:.*v_proj$"], "re:.*input_layernorm$"],
        [[*experts, *router], "re:.*post_attention_layernorm$"],
        [["re:.*down_proj$"], "re:.*up_proj$"],
    ]
    (smoother,) = smooth(
        model, [AWQModifier(weights=W4_G32, mappings=mappings, ignore=ignored("qwen3_moe"))]
    )
    assert len(smoother.smoothed) == 2 * (2 + 4)
    for block in ("model.layers.0", "model.layers.1"):
        norm = f"{block}.post_attention_layernorm"
        assert f"{block}.mlp.gate" not in dict(smoother.smoothed)[norm]
        scale = original.get_submodule(norm).weight / model.get_submodule(norm).weight
        assert_scaled_columns(model, original, f"{block}.mlp.gate", scale)
    assert_same_function(model, original)


def test_a_mapping_leaving_out_experts_is_refused_naming_the_norm_and_its_readers():
    model = linearized("mixtral")
    original = copy.deepcopy(model)
    mappings = [[["re:.*experts.*gate_proj"], "re:.*post_attention_layernorm"]]
    error = (
        r"smoothing 'model.layers.0.post_attention_layernorm' into \[.*experts.0.gate_proj.*"
        r"'model.layers.0.mlp.gate'\] changes the output of block 'model.layers.0' \(readers "
        r"found: \[.*'model.layers.0.mlp.experts.0.up_proj'"
    )
    with pytest.raises(RecipeError, match=error):
        smooth(model, [SmoothQuantModifier(mappings=mappings, ignore=ignored("mixtral"))])
    for key, value in model.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key


def test_a_norm_read_beyond_what_the_probes_follow_is_refused_naming_it():
    model = linearized("mixtral")
    original = copy.deepcopy(model)
    moe = model.model.layers[0].mlp
    forward = moe.forward
    moe.forward = lambda hidden: forward(hidden) + hidden.square()  # a reader without weights
    error = (
        r"smoothing 'model.layers.0.post_attention_layernorm' into the readers found, "
        r"\['model.layers.0.mlp.experts.0.up_proj'.*'model.layers.0.mlp.gate'\], changes the "
        r"output of block 'model.layers.0'"
    )
    with pytest.raises(RecipeError, match=error):
        smooth(model, [SmoothQuantModifier(ignore=ignored("mixtral"))])
    for key, value in model.state_dict().items():
        assert torch.equal(value, original.state_dict()[key]), key


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("gpt2", [("ln_1", ["attn.c_attn"]), ("ln_2", ["mlp.c_fc"])]),
        ("falcon", [("input_layernorm", ["self_attention.query_key_value", "mlp.dense_h_to_4h"])]),
        # two norms of one input with equal (untrained) outputs: each keeps its own readers
        (
            "gpt_neox",
            [
                ("input_layernorm", ["attention.query_key_value"]),
                ("post_attention_layernorm", ["mlp.dense_h_to_4h"]),
            ],
        ),
    ],
)
def test_gpt2_falcon_and_gpt_neox_are_smoothed_as_linear_layers(kind, expected):
    model = linearized(kind)
    original = copy.deepcopy(model)
    (smoother,) = smooth(model, [SmoothQuantModifier(smoothing_strength=0.8, ignore=["lm_head"])])
    blocks = "gpt_neox.layers" if kind == "gpt_neox" else "transformer.h"
    assert smoother.smoothed == [
        (f"{blocks}.{i}.{norm}", tuple(f"{blocks}.{i}.{layer}" for layer in layers))
        for i in range(2)
        for norm, layers in expected
    ]
    assert_same_function(model, original)


@pytest.mark.parametrize(
    "recipe",
    [
        lambda kind: [
            SmoothQuantModifier(smoothing_strength=0.8, ignore=ignored(kind)),
            QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignored(kind)),
        ],
        lambda kind: [
            AWQModifier(weights=W4_G32, ignore=ignored(kind)),
            QuantizationModifier(
                config_groups={"g": {"targets": ["Linear"], "weights": W4_G32}},
                ignore=ignored(kind),
            ),
        ],
    ],
    ids=["smoothquant_w8a8", "awq_rtn_w4"],
)
def test_smoothing_then_quantization_compresses_every_expert(recipe):
    model = linearized("qwen2_moe")
    smooth(model, recipe("qwen2_moe"))
    router_names = set(routers(model, "qwen2_moe"))
    layers = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.startswith("model.layers.")
    }
    assert len(layers) == 2 * (4 + 4 * 3 + 3 + 1)
    left = [
        n for n, m in layers.items() if n not in router_names and not hasattr(m, "weight_scale")
    ]
    assert not left


def test_reference_mappings_accept_experts_no_token_reached():
    model = linearized("gpt_oss")
    for layer in model.model.layers:
        layer.mlp.router.bias.data[3] = -1e4
    original = copy.deepcopy(model)
    experts = ["re:.*mlp.experts.*.gate_proj$", "re:.*mlp.experts.*.up_proj$"]
    mappings = [[experts, "re:.*post_attention_layernorm$"]]
    modifier = SmoothQuantModifier(mappings=mappings, ignore=ignored("gpt_oss"))
    (smoother,) = smooth(model, [modifier], all_experts=False)
    assert (
        "model.layers.0.mlp.experts.3.up_proj"
        in dict(smoother.smoothed)["model.layers.0.post_attention_layernorm"]
    )
    for copy_ in (model, original):
        for layer in copy_.model.layers:
            layer.mlp.router.bias.data[3] = 0.0
    assert_same_function(model, original)


@pytest.mark.parametrize("explicit", [False, True], ids=["found", "given"])
def test_one_probe_answers_for_every_expert(monkeypatch, explicit):
    """The probes a block costs do not grow with its number of experts."""
    mappings = [
        [["re:.*experts.*gate_proj$", "re:.*experts.*up_proj$"], "re:.*post_attention_layernorm"],
        [["re:.*down_proj$"], "re:.*up_proj$"],
    ]
    calls = []
    reached = BlockProbe.reached
    monkeypatch.setattr(
        BlockProbe, "reached", lambda self, *args: calls.append(1) or reached(self, *args)
    )
    counts = []
    for experts in (4, 8):
        config = tiny_config("mixtral")
        config.num_local_experts = experts
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        linearize(model)
        calls.clear()
        settings = {"mappings": mappings} if explicit else {}
        (smoother,) = smooth(model, [SmoothQuantModifier(ignore=ignored("mixtral"), **settings)])
        assert len(smoother.smoothed) == 2 * (1 + experts + (0 if explicit else 1))
        counts.append(len(calls))
    assert counts[0] == counts[1]


def test_probes_run_the_experts_on_their_routed_tokens_only(monkeypatch):
    """Replaying a block for a probe does not pay for every expert on every token."""
    model = linearized("mixtral")
    seen = []
    forward = LinearExperts.forward

    def spy(self, *args):
        seen.append((bool(Modifier._hooks_disabled_globally), self.calibrate_all))
        return forward(self, *args)

    monkeypatch.setattr(LinearExperts, "forward", spy)
    calibrate(model, [SmoothQuantModifier(ignore=ignored("mixtral"))], [token_ids(2, 16)])
    assert (True, False) in seen and (False, True) in seen
    assert (True, True) not in seen
