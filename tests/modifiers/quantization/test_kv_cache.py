"""KV-cache and attention quantization: fp8 scales calibrated on the keys and values the cache
stores, the fake-quantized attention, and what is refused."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from export_models import ARCHITECTURE, QUIET, token_ids
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from lightning_compress import oneshot
from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.attention import (
    is_attention_module,
    registered_implementations,
)
from lightning_compress.modifiers.quantization.kv_cache import quantized_attention
from lightning_compress.modifiers.quantization.kv_cache_math import (
    fake_quantize_states,
    observe_states,
    state_observer,
    state_scale,
)
from lightning_compress.recipe import RecipeError

FP8_MAX = 448.0
MODELS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**ARCHITECTURE)),
    "qwen3-gqa": lambda: Qwen3ForCausalLM(Qwen3Config(**ARCHITECTURE, head_dim=32)),
}


def kv_scheme(strategy: str) -> dict:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy}


def tiny(kind: str = "llama") -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def calibrate(model: nn.Module, modifier: QuantizationModifier, pipeline: str = "sequential"):
    oneshot(
        model,
        modifier,
        token_ids(),
        num_calibration_samples=8,
        pipeline=pipeline,
        trainer_kwargs=QUIET,
        progress=False,
    )


def attentions(model: nn.Module) -> list[nn.Module]:
    return [layer.self_attn for layer in model.model.layers]


def cached_states(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The keys and values the model's cache stores for the calibration tokens, per layer."""
    with torch.no_grad():
        cache = model(token_ids(), use_cache=True).past_key_values
    return [(layer.keys, layer.values) for layer in cache.layers]


def absmax_scale(x: torch.Tensor, strategy: str) -> torch.Tensor:
    """The slow reference: max|x| / 448 over every token, per tensor or per head."""
    if strategy == "tensor":
        return (x.abs().max() / FP8_MAX).reshape(1)
    per_head = [x[:, head].abs().max() / FP8_MAX for head in range(x.shape[1])]
    return torch.stack(per_head).reshape(-1, 1, 1)


def assert_scale(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float32 rounding: the maxima are exact, the keys and values computed in
    batches of another size may differ in their last bits."""
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_basic_pipeline_scales_are_the_absmax_of_the_cached_keys_and_values(
    kind: str, strategy: str
) -> None:
    model = tiny(kind)
    expected = cached_states(copy.deepcopy(model))
    calibrate(model, QuantizationModifier(kv_cache_scheme=kv_scheme(strategy)), "basic")
    heads = model.config.num_key_value_heads
    for attention, (keys, values) in zip(attentions(model), expected, strict=True):
        assert attention.k_scale.shape == ((1,) if strategy == "tensor" else (heads, 1, 1))
        assert_scale(attention.k_scale, absmax_scale(keys, strategy))
        assert_scale(attention.v_scale, absmax_scale(values, strategy))


def fp8_error(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The slow reference of the MSE observer's objective: ``sum |x - q(x)|^2.4``, q the fp8
    e4m3 round trip at ``scale`` (clamped to +-448), per row of ``x``."""
    steps = (x.double() / scale.double()).clamp(-FP8_MAX, FP8_MAX)
    rounded = steps.float().to(torch.float8_e4m3fn).double() * scale.double()
    return (rounded - x.double()).abs().pow(2.4).flatten(1).sum(dim=1)


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_mse_observer_picks_the_shrunk_scale_of_least_fp8_error(strategy: str) -> None:
    generator = torch.Generator().manual_seed(3)  # data where every head's best is shrunk
    shape = (1, 2, 64, 16)  # batch, heads, tokens, head_dim
    state = torch.randn(shape, generator=generator) * torch.randn(shape, generator=generator).exp()
    args = QuantizationArgs(**kv_scheme(strategy), observer="mse")
    observer = state_observer("attention", args).observer
    observe_states(observer, state, args)
    scale = state_scale(observer, args, torch.float32).reshape(-1, 1)
    rows = state.reshape(1, -1) if strategy == "tensor" else state.transpose(0, 1).flatten(1)
    absmax = rows.abs().amax(dim=1, keepdim=True) / FP8_MAX
    candidates = [absmax * shrink for shrink in torch.linspace(1.0, 0.2, 100).tolist()]
    errors = torch.stack([fp8_error(rows, c) for c in candidates])
    assert (errors.amin(dim=0) < errors[0] * (1 - 1e-3)).all()  # shrinking rounds better here
    assert (fp8_error(rows, scale) <= errors.amin(dim=0) * (1 + 1e-4)).all()  # the grid's least
    on_grid = torch.stack([torch.isclose(scale, c, rtol=1e-6, atol=0) for c in candidates])
    assert on_grid.any(dim=0).all()


def test_mse_kv_cache_scales_are_the_largest_of_each_batchs_best() -> None:
    args = QuantizationArgs(**kv_scheme("tensor"), observer="mse")
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(1, 2, 32, 16, generator=generator) * size for size in (1.0, 3.0)]
    alone = []
    for batch in batches:
        observer = state_observer("attention", args).observer
        observe_states(observer, batch, args)
        alone.append(state_scale(observer, args, torch.float32))
    both = state_observer("attention", args).observer
    for batch in batches:
        observe_states(both, batch, args)
    assert torch.equal(state_scale(both, args, torch.float32), torch.maximum(*alone))


def test_mse_kv_cache_observer_calibrates_scales_at_most_the_absmax() -> None:
    model = tiny()
    expected = cached_states(copy.deepcopy(model))
    scheme = {**kv_scheme("tensor"), "observer": "mse"}
    calibrate(model, QuantizationModifier(kv_cache_scheme=scheme), "basic")
    shrunk = []
    for attention, (keys, values) in zip(attentions(model), expected, strict=True):
        for scale, states in ((attention.k_scale, keys), (attention.v_scale, values)):
            absmax = absmax_scale(states, "tensor")
            assert 0 < scale.item() <= absmax.item() * (1 + 1e-5)
            shrunk.append(scale.item() < absmax.item() * (1 - 1e-3))
    assert any(shrunk)


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_sequential_pipeline_calibrates_each_block_on_the_quantized_attention_before_it(
    strategy: str,
) -> None:
    model = tiny()
    basic = copy.deepcopy(model)
    calibrate(basic, QuantizationModifier(kv_cache_scheme=kv_scheme(strategy)), "basic")
    calibrate(model, QuantizationModifier(kv_cache_scheme=kv_scheme(strategy)), "sequential")
    # Block 0 sees the same inputs in both pipelines: the same scales.
    first, first_basic = attentions(model)[0], attentions(basic)[0]
    assert_scale(first.k_scale, first_basic.k_scale)
    assert_scale(first.v_scale, first_basic.v_scale)
    # Later blocks were calibrated on the outputs of the blocks before, quantized: what the
    # cache stores while the model runs with its attention quantized.
    assert_scales_follow_the_quantized_model(model, strategy)


def test_float_activations_in_calibration_calibrate_every_block_on_unquantized_attention() -> None:
    model = tiny()
    expected = cached_states(copy.deepcopy(model))
    modifier = QuantizationModifier(
        kv_cache_scheme=kv_scheme("tensor"), quantize_activations_in_calibration=False
    )
    calibrate(model, modifier, "sequential")
    for attention, (keys, values) in zip(attentions(model), expected, strict=True):
        assert_scale(attention.k_scale, absmax_scale(keys, "tensor"))
        assert_scale(attention.v_scale, absmax_scale(values, "tensor"))
    with quantized_attention(model):  # the default calibrates later blocks on fp8 attention
        quantized = cached_states(model)
    assert not torch.equal(attentions(model)[1].k_scale, absmax_scale(quantized[1][0], "tensor"))


def test_staged_blocks_calibrate_keys_from_their_quantized_projections() -> None:
    # Round-to-nearest weights: each block runs once, q/k/v_proj quantized before attention.
    model = tiny()
    modifier = QuantizationModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}},
        ignore=["lm_head"],
        kv_cache_scheme=kv_scheme("attn_head"),
    )
    calibrate(model, modifier, "sequential")
    assert_scales_follow_the_quantized_model(model, "attn_head", first=0)


def assert_scales_follow_the_quantized_model(
    model: nn.Module, strategy: str, first: int = 1
) -> None:
    """Each block's scales are those of the keys and values its cache stores while the
    compressed model runs with its attention quantized (the blocks before it quantized)."""
    with quantized_attention(model):
        expected = cached_states(model)
    pairs = zip(attentions(model)[first:], expected[first:], strict=True)
    for attention, (keys, values) in pairs:
        assert_scale(attention.k_scale, absmax_scale(keys, strategy))
        assert_scale(attention.v_scale, absmax_scale(values, strategy))


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_fake_quantized_states_are_fp8_values_within_fp8_rounding(strategy: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8) * torch.tensor([1.0, 10.0, 0.1]).reshape(1, 3, 1, 1)
    scale = absmax_scale(x, strategy)
    args = QuantizationArgs(type="float", strategy=strategy)
    x_hat = fake_quantize_states(x, scale, args)
    scale_of = scale.reshape(1, -1, 1, 1) if strategy == "attn_head" else scale
    on_grid = x_hat / scale_of
    # Every value is an fp8 e4m3 number times its scale, and rounds to nearest: relative error
    # at most 2**-4 for normal fp8 values, absolute 2**-10 * scale for subnormal ones.
    fp8 = on_grid.to(torch.float8_e4m3fn).float()
    torch.testing.assert_close(on_grid, fp8, rtol=1e-6, atol=1e-6)
    bound = torch.maximum(x.abs() * 2**-4, scale_of * 2**-10)
    assert bool(((x_hat - x).abs() <= bound * (1 + 1e-6)).all())


def test_quantized_attention_changes_the_logits_by_fp8_error_only() -> None:
    model = tiny()
    calibrate(model, QuantizationModifier(kv_cache_scheme=kv_scheme("attn_head")))
    with torch.no_grad():
        plain = model(token_ids()).logits
        with quantized_attention(model):
            quantized = model(token_ids()).logits
    difference = (quantized - plain).abs().max().item()
    assert 0 < difference < 0.05 * plain.abs().max().item()


def test_attention_group_quantizes_queries_with_per_head_scales() -> None:
    model = tiny()
    group = {"targets": ["re:.*self_attn$"], "input_activations": kv_scheme("attn_head")}
    calibrate(model, QuantizationModifier(config_groups={"attention": group}), "basic")
    for attention in attentions(model):
        assert attention.q_scale.shape == (model.config.num_attention_heads, 1, 1)
        assert attention.k_scale.shape == (model.config.num_key_value_heads, 1, 1)
        assert attention.attention_scheme.queries is not None


def test_gptq_with_a_kv_cache_scheme_quantizes_weights_and_calibrates_scales() -> None:
    model = tiny()
    weights = {"num_bits": 4, "strategy": "group", "group_size": 32}
    modifier = GPTQModifier(
        config_groups={"g": {"targets": ["Linear"], "weights": weights}},
        ignore=["lm_head"],
        kv_cache_scheme=kv_scheme("tensor"),
    )
    calibrate(model, modifier)
    assert all(attention.k_scale.shape == (1,) for attention in attentions(model))
    assert model.model.layers[1].mlp.down_proj.quantization_scheme is not None


def test_nothing_of_the_routing_is_left_after_calibration() -> None:
    model = tiny()
    calibrate(model, QuantizationModifier(kv_cache_scheme=kv_scheme("tensor")))
    assert registered_implementations() == []
    assert model.config._attn_implementation == "sdpa"
    for attention in attentions(model):
        assert not attention._forward_hooks and not attention._forward_pre_hooks


# ------------------------------------------------------------------------ refusals
class InlineAttention(LlamaAttention):
    """Computes attention itself instead of calling transformers' AttentionInterface."""

    def forward(
        self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs
    ):
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        groups = self.num_key_value_groups
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        out = nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def with_inline_attention() -> nn.Module:
    model = tiny()
    for attention in attentions(model):
        attention.__class__ = InlineAttention
    return model


def test_an_attention_module_that_computes_attention_itself_is_refused_by_class() -> None:
    model = with_inline_attention()
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn' \(InlineAttention\)"):
        calibrate(model, QuantizationModifier(kv_cache_scheme=kv_scheme("tensor")))
    assert registered_implementations() == []
    assert model.config._attn_implementation == "sdpa"


def test_an_attention_module_that_never_reaches_the_interface_fails_and_leaves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its module seems to use the interface, but its forward does not call it.
    monkeypatch.setattr(
        sys.modules[__name__], "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS, raising=False
    )
    model = with_inline_attention()
    with pytest.raises(ValueError, match=r"\(InlineAttention\) ran without calling"):
        calibrate(model, QuantizationModifier(kv_cache_scheme=kv_scheme("tensor")), "basic")
    assert registered_implementations() == []
    assert model.config._attn_implementation == "sdpa"
    for attention in attentions(model):
        assert not attention._forward_hooks and not attention._forward_pre_hooks
        assert not hasattr(attention, "k_scale") and not hasattr(attention, "attention_scheme")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "int"}, "kv_cache_scheme.type"),
        ({"strategy": "channel"}, "kv_cache_scheme.strategy"),
        ({"strategy": "token", "dynamic": True}, "kv_cache_scheme.strategy"),
        ({"observer": "memoryless_mse"}, "kv_cache_scheme.observer"),
        ({"strategie": "tensor"}, "kv_cache_scheme: unknown key"),
    ],
)
def test_a_bad_kv_cache_scheme_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(RecipeError, match=f"QuantizationModifier.{field}"):
        QuantizationModifier(kv_cache_scheme={**kv_scheme("tensor"), **change})


class VisionAttention(nn.Module):
    """An encoder's attention: projections, but no cache."""

    def __init__(self) -> None:
        super().__init__()
        self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def test_only_attention_that_takes_a_cache_is_a_kv_cache_attention() -> None:
    assert is_attention_module(tiny().model.layers[0].self_attn)
    assert not is_attention_module(VisionAttention())
    assert not is_attention_module(nn.Linear(8, 8))


def test_a_kv_cache_scheme_on_a_model_without_attention_is_refused() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(RecipeError, match="Sequential has no attention module"):
        CompressionSession().initialize(
            recipe=QuantizationModifier(kv_cache_scheme=kv_scheme("tensor")), model=model
        )


def test_an_attention_group_targeting_linear_layers_is_refused() -> None:
    group = {"targets": ["re:.*q_proj$"], "input_activations": kv_scheme("tensor")}
    with pytest.raises(RecipeError, match="are not attention modules"):
        calibrate(tiny(), QuantizationModifier(config_groups={"attention": group}))


def test_attn_head_weights_are_refused() -> None:
    group = {"targets": ["Linear"], "weights": {"type": "float", "strategy": "attn_head"}}
    with pytest.raises(RecipeError, match="weights.strategy"):
        QuantizationModifier(config_groups={"g": group})


# ------------------------------------------------------------ quantization-aware training
def train(model: nn.Module, modifier: QuantizationModifier, steps: int, lr: float = 0.0):
    """Steps a session through ``steps`` training batches by hand; returns it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    session = CompressionSession()
    session.initialize(recipe=modifier, model=model.train(), optimizer=optimizer)
    for step in range(steps):
        session.event(EventType.BATCH_START, global_step=step, global_batch=step)
        ids = token_ids(4, seed=step)
        loss = model(ids, labels=ids).loss
        session.event(EventType.LOSS_CALCULATED, loss=loss)
        loss.backward()
        session.event(EventType.OPTIM_PRE_STEP)
        optimizer.step()
        optimizer.zero_grad()
        session.event(EventType.OPTIM_POST_STEP)
        session.event(EventType.BATCH_END)
    return session


def one_layer() -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**ARCHITECTURE, "num_hidden_layers": 1}))


@pytest.mark.parametrize("strategy", ["tensor", "attn_head"])
def test_training_scales_are_the_absmax_of_every_training_batch(strategy: str) -> None:
    model = one_layer()  # one block: its keys and values do not depend on quantization
    reference = copy.deepcopy(model).eval()
    session = train(model, QuantizationModifier(kv_cache_scheme=kv_scheme(strategy), start=0), 3)
    with torch.no_grad():
        states = [reference(token_ids(4, seed=step), use_cache=True) for step in range(3)]
    keys = torch.cat([out.past_key_values.layers[0].keys for out in states])
    values = torch.cat([out.past_key_values.layers[0].values for out in states])
    session.finalize()
    attention = model.model.layers[0].self_attn
    assert_scale(attention.k_scale, absmax_scale(keys, strategy))
    assert_scale(attention.v_scale, absmax_scale(values, strategy))
    assert sorted(attention._buffers) == ["k_scale", "v_scale"]  # ranges dropped at the end
    assert registered_implementations() == []
    assert model.config._attn_implementation == "sdpa"


def test_training_with_the_mse_observer_keeps_each_batchs_shrunk_scale() -> None:
    model = one_layer()
    reference = copy.deepcopy(model).eval()
    scheme = {**kv_scheme("tensor"), "observer": "mse"}
    session = train(model, QuantizationModifier(kv_cache_scheme=scheme, start=0), 3)
    with torch.no_grad():
        states = [reference(token_ids(4, seed=step), use_cache=True) for step in range(3)]
    session.finalize()
    attention = model.model.layers[0].self_attn
    for role, scale in (("keys", attention.k_scale), ("values", attention.v_scale)):
        seen = torch.cat([getattr(out.past_key_values.layers[0], role) for out in states])
        absmax = absmax_scale(seen, "tensor").item()
        assert absmax * 0.2 * (1 - 1e-5) <= scale.item() <= absmax * (1 + 1e-5), role


def test_training_forward_is_the_one_shot_fake_quantization_with_straight_through_gradients():
    model = one_layer()
    modifier = QuantizationModifier(kv_cache_scheme=kv_scheme("attn_head"), start=0)
    session = train(model, modifier, 1)
    attention = model.model.layers[0].self_attn
    scales = (attention.k_scale.clone(), attention.v_scale.clone())
    with torch.no_grad():
        trained = model.eval()(token_ids(2)).logits  # eval: quantized with the scales, no update
    session.finalize()
    assert torch.equal(attention.k_scale, scales[0]) and torch.equal(attention.v_scale, scales[1])
    with torch.no_grad(), quantized_attention(model):
        expected = model(token_ids(2)).logits
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)
    # The gradient reaches the key projection through the quantized keys.
    model.train()
    with quantized_attention(model):
        model(token_ids(2), labels=token_ids(2)).loss.backward()
    assert bool(model.model.layers[0].self_attn.k_proj.weight.grad.abs().sum() > 0)


def test_training_buffers_exist_from_initialize_so_checkpoints_load_strictly() -> None:
    model = one_layer()
    session = CompressionSession()
    modifier = QuantizationModifier(kv_cache_scheme=kv_scheme("attn_head"), start=0)
    session.initialize(recipe=modifier, model=model.train())
    attention = model.model.layers[0].self_attn
    assert attention.k_scale.shape == (model.config.num_key_value_heads, 1, 1)
    assert {"k_min_vals", "k_max_vals", "v_min_vals", "v_max_vals"} <= set(attention._buffers)
    session.finalize()  # training never started: nothing is left
    assert not hasattr(attention, "k_scale") and not hasattr(attention, "attention_scheme")
