"""The linearizing driver: swaps claimed modules, refuses unknown fused layouts, undoes."""

from __future__ import annotations

import pytest
import torch
from moe_models import MOE_CONFIGS, tiny_moe, tokens
from torch import nn

from lightning_compress.core import CompressionLifecycle, State
from lightning_compress.layers import LayerAdapter, LinearExperts, linearize, register_adapter
from lightning_compress.layers.experts import FusedExpertsAdapter
from lightning_compress.modifiers import QuantizationModifier


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens()).logits


class Fused3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 3, 4))


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([Fused3D()])


class Embedded(nn.Module):
    """A 3-D parameter that holds no stack of matrices, or lives outside the blocks."""

    def __init__(self, *shape: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(*shape))


def test_a_second_linearize_changes_nothing():
    model = tiny_moe("mixtral")
    assert len(linearize(model)) == 2
    before = dict(model.named_modules())
    assert len(linearize(model)) == 0
    assert dict(model.named_modules()) == before


def fused_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: tensor.clone() for name, tensor in model.state_dict().items() if "experts" in name
    }


@pytest.mark.parametrize("kind", list(MOE_CONFIGS))
def test_undo_puts_the_fused_modules_back_with_their_weights(kind):
    model = tiny_moe(kind)
    original = model.model.layers[1].mlp.experts if kind != "granitemoe" else None
    before = fused_state(model)
    expected = logits(model)
    swaps = linearize(model)
    assert all(
        isinstance(module, LinearExperts)
        for name, module in model.named_modules()
        if name.endswith(".experts")
    )
    swaps.undo()
    if original is not None:
        assert model.model.layers[1].mlp.experts is original
    after = fused_state(model)
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
    assert torch.equal(logits(model), expected)


def test_the_fused_weights_are_freed_once_each_expert_holds_its_copy():
    model = tiny_moe("mixtral")
    fused = model.model.layers[0].mlp.experts
    dtype = fused.gate_up_proj.dtype
    linearize(model)
    assert fused.gate_up_proj.numel() == 0 and fused.down_proj.numel() == 0
    assert fused.gate_up_proj.dtype == dtype


def test_an_unknown_fused_parameter_is_refused_before_anything_changes():
    model = Holder()
    model.experts = tiny_moe("mixtral").model.layers[0].mlp.experts
    with pytest.raises(ValueError, match=r"Holder holds blocks\.0\.weight with shape \(2, 3, 4\)"):
        linearize(model)
    assert not isinstance(model.experts, LinearExperts)


def test_embeddings_outside_the_blocks_and_per_channel_vectors_inside_are_accepted():
    model = Holder()
    model.blocks = nn.ModuleList([Embedded(1, 1, 4), Embedded(3, 4, 1)])  # no matrices
    model.vision = Embedded(1, 5, 4)  # a vision tower's position embeddings, outside the blocks
    assert len(linearize(model)) == 0


def test_a_layout_the_adapter_refuses_leaves_the_model_unchanged():
    model = tiny_moe("mixtral")
    first = model.model.layers[0].mlp.experts
    broken = model.model.layers[1].mlp.experts
    broken.down_proj = nn.Parameter(torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts \(MixtralExperts\).*down_proj"):
        linearize(model)
    assert model.model.layers[0].mlp.experts is first


def test_register_adapter_refuses_what_is_not_an_adapter():
    with pytest.raises(TypeError, match="LayerAdapter"):
        register_adapter(object())


def test_register_adapter_keeps_one_adapter_of_each_kind():
    from lightning_compress.layers import ADAPTERS

    count = len(ADAPTERS)
    register_adapter(FusedExpertsAdapter())
    assert len(ADAPTERS) == count


class Failing(LayerAdapter):
    """Claims one module and fails to build its replacement."""

    def __init__(self, target: nn.Module):
        self.target = target

    def claims(self, module):
        return module is self.target

    def linearize(self, module):
        raise RuntimeError("cannot build")


def test_a_replacement_that_fails_to_build_leaves_the_model_unchanged():
    model = tiny_moe("mixtral")
    experts = model.model.layers[0].mlp.experts
    before = fused_state(model)
    with pytest.raises(RuntimeError, match="cannot build"):
        linearize(model, adapters=[FusedExpertsAdapter(), Failing(model.lm_head)])
    assert model.model.layers[0].mlp.experts is experts
    after = fused_state(model)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_lifecycle_initialize_linearizes_and_undoes_on_failure():
    model = tiny_moe("olmoe")
    experts = model.model.layers[0].mlp.experts
    failing = QuantizationModifier(targets=["Linear"], scheme="W4A16")  # groups of 128 > 32
    lifecycle = CompressionLifecycle(state=State())
    with pytest.raises(Exception, match="group_size"):
        lifecycle.initialize(recipe=failing, model=model)
    assert model.model.layers[0].mlp.experts is experts

    lifecycle = CompressionLifecycle(state=State())
    lifecycle.initialize(model=model)
    assert isinstance(model.model.layers[0].mlp.experts, LinearExperts)
    with torch.no_grad():
        model(tokens())


def test_llama4_experts_are_refused_naming_the_parameter_and_the_model():
    from transformers import AutoModelForCausalLM, Llama4TextConfig

    config = Llama4TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=4,
    )
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(
        ValueError,
        match=r"Llama4ForCausalLM holds model\.layers\.0\.feed_forward\.experts\.gate_up_proj",
    ):
        linearize(model)
