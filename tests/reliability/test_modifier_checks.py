"""What the modifiers refuse or say before they change a model.

- Non-finite weights and calibration inputs: every algorithm names the exact layer (and
  whether its weight or its calibration input is at fault) and leaves the model unchanged;
  faults are planted at random layers and positions with a fixed seed.
- Tied embeddings: compressing ``lm_head`` gives it its own weight (with a warning), so the
  input embedding stays as it was and the exported checkpoint loads in transformers.
- Targets that ``ignore`` empties are an error naming the modifier, its targets and ignore;
  an ``ignore`` entry that matches nothing is named in a warning.
"""

from __future__ import annotations

import copy
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
from helpers import int8_channel_groups
from lightning.pytorch import Callback, Trainer
from lightning_models import Regressor, regression_loader
from loguru import logger
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from lightning_compress import Compressor, oneshot, save_compressed
from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core import CompressionSession, EventType
from lightning_compress.modifiers import (
    AWQModifier,
    ConstantPruningModifier,
    GPTQModifier,
    MagnitudePruningModifier,
    Modifier,
    QuantizationModifier,
    SmoothQuantModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)
from lightning_compress.recipe import RecipeError

SEED = 15
VOCAB = 64
W4_G32 = {"num_bits": 4, "strategy": "group", "group_size": 32}


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tied_tiny_decoder() -> TinyDecoder:
    torch.manual_seed(0)
    config = TinyDecoderConfig(
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=VOCAB,
        max_seq_len=32,
    )
    decoder = TinyDecoder(config).eval()
    decoder.lm_head.weight = decoder.model.embed_tokens.weight
    return decoder


def token_ids(n: int = 2, length: int = 8) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def calibrate(model: nn.Module, modifier: Modifier, **kwargs) -> nn.Module:
    return oneshot(model, modifier, dataset=token_ids(), num_calibration_samples=2, **kwargs)


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(str(message)), level="WARNING")
    try:
        yield messages
    finally:
        logger.remove(sink)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return copy.deepcopy(model.state_dict())


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same tensors (NaN where NaN was planted), no hook, parametrization or qparam left."""
    after = model.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True)
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert not parametrize.is_parametrized(module)
        assert not hasattr(module, "quantization_scheme")


# ---------------------------------------------------------- non-finite values
ONE_SHOT: dict[str, Callable[[], Modifier]] = {
    "rtn": lambda: QuantizationModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
    "rtn-static-inputs": lambda: QuantizationModifier(scheme="FP8", ignore=["lm_head"]),
    "gptq": lambda: GPTQModifier(config_groups=int8_channel_groups(), ignore=["lm_head"]),
    "sparsegpt": lambda: SparseGPTModifier(sparsity=0.5, ignore=["lm_head"]),
    "wanda": lambda: WandaPruningModifier(sparsity=0.5, ignore=["lm_head"]),
    "smoothquant": lambda: SmoothQuantModifier(ignore=["lm_head"]),
    "awq": lambda: AWQModifier(weights=W4_G32, ignore=["lm_head"]),
}
TRAINING: dict[str, Callable[[], Modifier]] = {
    "qat": lambda: QuantizationModifier(config_groups=int8_channel_groups(), start=0),
    "gradual-pruning": lambda: MagnitudePruningModifier(final_sparsity=0.5, start=0, end=4),
    "constant-pruning": lambda: ConstantPruningModifier(start=0),
}
DATA_FREE = {"magnitude": lambda: MagnitudePruningModifier(final_sparsity=0.5, ignore=["lm_head"])}
ALGORITHMS = {**ONE_SHOT, **DATA_FREE, **TRAINING}
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
LINEARS = [name for name, m in tiny_llama().named_modules() if isinstance(m, nn.Linear)]
BLOCK_LINEARS = [name for name in LINEARS if name != "lm_head"]


def weight_faults() -> list:
    """One fault per algorithm and value: a random targeted layer and weight position."""
    draw = random.Random(SEED)
    cases = []
    for algorithm in ALGORITHMS:
        for label, value in VALUES.items():
            layers = LINEARS if algorithm in TRAINING else BLOCK_LINEARS
            layer = draw.choice(layers)
            out_features, in_features = tiny_llama().get_submodule(layer).weight.shape
            position = (draw.randrange(out_features), draw.randrange(in_features))
            case = (algorithm, value, layer, position)
            cases.append(pytest.param(*case, id=f"{algorithm}-{label}-{layer}-{position}"))
    return cases


@pytest.mark.parametrize(("algorithm", "value", "layer", "position"), weight_faults())
def test_a_non_finite_weight_is_refused_naming_its_layer_before_any_change(
    algorithm, value, layer, position
):
    model = tiny_llama()
    with torch.no_grad():
        model.get_submodule(layer).weight[position] = value
    before = snapshot(model)
    expected = rf"the weight of layer '{re.escape(layer)}' holds NaN or Inf \(1 value\(s\), "
    expected += rf"the first {value} at \[{position[0]}, {position[1]}\]\)"
    with pytest.raises(ValueError, match=expected):
        if algorithm in TRAINING:
            CompressionSession().initialize(recipe=ALGORITHMS[algorithm](), model=model)
        else:
            calibrate(model, ALGORITHMS[algorithm]())
    assert_unchanged(model, before)


def several_weight_faults() -> list:
    """Per algorithm, three draws of 2 to 6 non-finite values over random targeted layers."""
    draw = random.Random(SEED + 2)
    cases = []
    for algorithm in ALGORITHMS:
        layers = LINEARS if algorithm in TRAINING else BLOCK_LINEARS
        for index in range(3):
            faults = []
            for _ in range(draw.randint(2, 6)):
                layer = draw.choice(layers)
                out_features, in_features = tiny_llama().get_submodule(layer).weight.shape
                position = (draw.randrange(out_features), draw.randrange(in_features))
                faults.append((layer, position, draw.choice(list(VALUES.values()))))
            cases.append(pytest.param(algorithm, faults, id=f"{algorithm}-{index}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize(("algorithm", "faults"), several_weight_faults())
def test_several_non_finite_weights_name_the_first_layer_its_count_and_first_position(
    algorithm, faults
):
    model = tiny_llama()
    with torch.no_grad():
        for layer, position, value in faults:
            model.get_submodule(layer).weight[position] = value
    before = snapshot(model)
    first_layer = min((layer for layer, _, _ in faults), key=LINEARS.index)
    planted = {position: value for layer, position, value in faults if layer == first_layer}
    first = min(planted)  # row-major order
    expected = rf"the weight of layer '{re.escape(first_layer)}' holds NaN or Inf "
    expected += rf"\({len(planted)} value\(s\), the first {planted[first]} at "
    expected += rf"\[{first[0]}, {first[1]}\]\)"
    with pytest.raises(ValueError, match=expected):
        if algorithm in TRAINING:
            CompressionSession().initialize(recipe=ALGORITHMS[algorithm](), model=model)
        else:
            calibrate(model, ALGORITHMS[algorithm]())
    assert_unchanged(model, before)


def input_faults() -> list:
    """One fault per algorithm that reads calibration inputs: a random layer and token."""
    draw = random.Random(SEED + 1)
    cases = []
    for algorithm in ONE_SHOT:
        if algorithm == "rtn":  # weight-only round to nearest reads no activation
            continue
        for label, value in VALUES.items():
            layer = draw.choice(BLOCK_LINEARS)
            width = tiny_llama().get_submodule(layer).in_features
            position = (draw.randrange(8), draw.randrange(width))  # a token of a batch
            case = (algorithm, value, layer, position)
            cases.append(pytest.param(*case, id=f"{algorithm}-{label}-{layer}-{position}"))
    return cases


@pytest.mark.parametrize(("algorithm", "value", "layer", "position"), input_faults())
def test_non_finite_calibration_inputs_name_the_layer_they_enter(algorithm, value, layer, position):
    model = tiny_llama()
    target = model.get_submodule(layer)

    def corrupt(module: nn.Module, args: tuple) -> tuple:
        x = args[0].clone()
        x.view(-1, x.shape[-1])[position] = value
        return (x, *args[1:])

    handle = target.register_forward_pre_hook(corrupt)  # runs before the modifier's hooks
    block = model.get_submodule(layer.rsplit(".", 2)[0])
    block_before = snapshot(block)
    with pytest.raises(ValueError, match=rf"'{re.escape(layer)}'.*NaN or Inf"):
        # the staged pipeline cannot replay a layer whose pre-hook changes its input
        calibrate(model, ONE_SHOT[algorithm](), staged=False)
    handle.remove()
    assert_unchanged(block, block_before)  # earlier blocks may stay compressed, consistently


def test_a_quantization_aware_run_that_diverged_is_refused_at_the_bake():
    model = tiny_llama()
    session = CompressionSession()
    session.initialize(
        recipe=QuantizationModifier(config_groups=int8_channel_groups(), start=0), model=model
    )
    session.event(EventType.BATCH_START, global_step=0)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.parametrizations.weight.original[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"weight of layer 'model.layers.1.mlp.down_proj' holds"):
        session.finalize()


def test_gradual_pruning_refuses_to_score_weights_that_diverged():
    model = tiny_llama()
    session = CompressionSession()
    recipe = MagnitudePruningModifier(final_sparsity=0.5, start=0, end=4, update=1)
    session.initialize(recipe=recipe, model=model)
    session.event(EventType.BATCH_START, global_step=0)
    layer = model.model.layers[0].self_attn.k_proj
    with torch.no_grad():
        layer.weight[3, 5] = float("inf")
    masks = {
        name: m.weight_mask.clone()
        for name, m in model.named_modules()
        if hasattr(m, "weight_mask")
    }
    rest_of_the_step = [
        (EventType.LOSS_CALCULATED, {"loss": torch.tensor(1.0)}),
        (EventType.OPTIM_PRE_STEP, {}),
        (EventType.OPTIM_POST_STEP, {}),
        (EventType.BATCH_END, {}),
        (EventType.BATCH_START, {}),  # the next update of the schedule is due by here
    ]
    with pytest.raises(
        ValueError, match=r"weight of layer 'model.layers.0.self_attn.k_proj' holds"
    ):
        for event, kwargs in rest_of_the_step:
            step = 1 if event == EventType.BATCH_START else 0
            session.event(event, global_step=step, **kwargs)
    for name, mask in masks.items():  # no mask was changed
        assert torch.equal(model.get_submodule(name).weight_mask, mask)


# ------------------------------------------------------------ tied embeddings
def test_quantizing_a_tied_lm_head_unties_it_and_the_export_loads(tmp_path):
    model = tiny_llama(tie=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    with warnings_logged() as warnings:
        oneshot(model, QuantizationModifier(config_groups=int8_channel_groups()))
    assert any(
        "layer 'lm_head' shares its weight with ['model.embed_tokens']" in w for w in warnings
    )
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert hasattr(model.lm_head, "weight_scale")
    assert not model.config.tie_word_embeddings
    assert "lm_head.weight" not in model.all_tied_weights_keys

    save_compressed(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    x = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=1e-5, atol=1e-5)


def test_the_bundled_decoder_with_a_tied_lm_head_is_untied_and_exports(tmp_path):
    model = tied_tiny_decoder()
    embedding = model.model.embed_tokens.weight.detach().clone()
    oneshot(model, QuantizationModifier(config_groups=int8_channel_groups()))
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    save_compressed(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    x = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pruner", [SparseGPTModifier, WandaPruningModifier])
def test_pruning_a_tied_lm_head_leaves_the_embedding_whole(pruner, tmp_path):
    model = tiny_llama(tie=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    calibrate(model, pruner(sparsity=0.5), pipeline="basic")
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert float((model.lm_head.weight == 0).float().mean()) == pytest.approx(0.5)
    save_compressed(model, tmp_path / "out")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(loaded.model.embed_tokens.weight, embedding, rtol=0, atol=0)
    torch.testing.assert_close(loaded.lm_head.weight, model.lm_head.weight, rtol=0, atol=0)


def test_smoothing_never_folds_into_a_tied_lm_head():
    model = tiny_llama(tie=True)
    embedding = model.model.embed_tokens.weight.detach().clone()
    x = token_ids()
    with torch.no_grad():
        expected = model(x).logits
    query = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    calibrate(model, SmoothQuantModifier(), pipeline="basic")
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, query)  # smoothed
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-4, atol=1e-4)

    explicit = SmoothQuantModifier(mappings=[[["lm_head"], "model.norm"]])
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"'model.norm' into \['lm_head'\].*tied embeddings"):
        calibrate(model, explicit, pipeline="basic")
    assert_unchanged(model, before)


def test_a_tied_weight_the_optimizer_already_holds_is_refused_untouched():
    model = tiny_llama(tie=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model)
    qat = QuantizationModifier(config_groups=int8_channel_groups(), start=0)
    with pytest.raises(RecipeError, match=r"layer 'lm_head' shares its weight.*optimizer"):
        CompressionSession().initialize(recipe=qat, model=model, optimizer=optimizer)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    assert_unchanged(model, before)


class TiedLanguageModel(Regressor):
    """A tied tiny Llama trained on next-token prediction."""

    def __init__(self) -> None:
        super().__init__(lr=0.1)
        self.net = tiny_llama(tie=True).train()

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        return self.net(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class OptimizedWeights(Callback):
    """Records, when training starts, which of the embedding and lm_head weights are trained."""

    def on_train_start(self, trainer: Trainer, pl_module: TiedLanguageModel) -> None:
        net = pl_module.net
        trained = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        head = net.lm_head
        head_weight = (
            head.parametrizations.weight.original
            if parametrize.is_parametrized(head)
            else head.weight
        )
        self.embedding_trained = id(net.model.embed_tokens.weight) in trained
        self.head_trained = id(head_weight) in trained
        self.shared = head_weight is net.model.embed_tokens.weight


def fit(module: Regressor, modifier: Modifier, data, *callbacks: Callback) -> Trainer:
    trainer = Trainer(
        max_epochs=1,
        callbacks=[Compressor(modifier), *callbacks],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return trainer


def token_loader() -> DataLoader:
    return DataLoader(TensorDataset(token_ids(4)), batch_size=2)


def test_quantization_aware_training_of_a_tied_lm_head_trains_both_copies():
    module = TiedLanguageModel()
    embedding = module.net.model.embed_tokens.weight.detach().clone()
    record = OptimizedWeights()
    qat = QuantizationModifier(config_groups=int8_channel_groups("net.lm_head"), start=0)
    fit(module, qat, token_loader(), record)
    assert not record.shared and record.head_trained and record.embedding_trained
    net = module.net
    assert not torch.equal(net.model.embed_tokens.weight, embedding)  # trained, not quantized
    assert hasattr(net.lm_head, "weight_scale")


def test_magnitude_pruning_of_a_tied_lm_head_leaves_the_embedding_dense():
    module = TiedLanguageModel()
    pruning = MagnitudePruningModifier(
        init_sparsity=0.5, final_sparsity=0.5, start=0, end=1, targets="net.lm_head"
    )
    record = OptimizedWeights()
    fit(module, pruning, token_loader(), record)
    assert not record.shared and record.head_trained and record.embedding_trained
    net = module.net
    assert float((net.lm_head.weight == 0).float().mean()) == pytest.approx(0.5)
    assert not bool((net.model.embed_tokens.weight == 0).any())


# ------------------------------------------------------------ targets / ignore
EVERY_LINEAR = ["re:.*_proj", "lm_head"]
IGNORING_ALL: dict[str, Callable[[], Modifier]] = {
    "rtn": lambda: QuantizationModifier(config_groups=int8_channel_groups(), ignore=EVERY_LINEAR),
    "qat": lambda: QuantizationModifier(
        config_groups=int8_channel_groups(), ignore=EVERY_LINEAR, start=0
    ),
    "gptq": lambda: GPTQModifier(config_groups=int8_channel_groups(), ignore=EVERY_LINEAR),
    "sparsegpt": lambda: SparseGPTModifier(sparsity=0.5, ignore=EVERY_LINEAR),
    "wanda": lambda: WandaPruningModifier(sparsity=0.5, ignore=EVERY_LINEAR),
    "smoothquant": lambda: SmoothQuantModifier(ignore=EVERY_LINEAR),
    "awq": lambda: AWQModifier(ignore=EVERY_LINEAR),
    "magnitude": lambda: MagnitudePruningModifier(
        init_sparsity=0.1, final_sparsity=0.5, start=0, end=1, ignore=EVERY_LINEAR
    ),
    "constant": lambda: ConstantPruningModifier(start=0, ignore=EVERY_LINEAR),
}


@pytest.mark.parametrize("name", list(IGNORING_ALL))
def test_targets_that_ignore_empties_are_an_error_naming_the_modifier(name):
    model = tiny_llama()
    before = snapshot(model)
    modifier = IGNORING_ALL[name]()
    owner = type(modifier).__name__
    expected = rf"{owner}\.ignore: .*'lm_head'\] removes every module that targets \['Linear'\]"
    with pytest.raises(RecipeError, match=expected + r".*would compress nothing"):
        CompressionSession().initialize(recipe=modifier, model=model)
    assert_unchanged(model, before)


def test_oneshot_refuses_a_recipe_that_ignores_every_target_before_calibrating():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(RecipeError, match=r"GPTQModifier\.ignore: .* would compress nothing"):
        calibrate(model, IGNORING_ALL["gptq"]())
    assert_unchanged(model, before)


def test_training_refuses_a_recipe_that_ignores_every_target_before_the_first_step():
    module = Regressor()
    before = snapshot(module)
    pruning = MagnitudePruningModifier(
        init_sparsity=0.1, final_sparsity=0.5, start=0, end=1, ignore=["fc1", "fc2"]
    )
    with pytest.raises(RecipeError, match=r"ignore: \['fc1', 'fc2'\] removes every module"):
        fit(module, pruning, regression_loader())
    assert_unchanged(module, before)


def test_an_ignore_entry_that_matches_nothing_is_named_once():
    groups = {
        "a": {"targets": ["re:.*mlp\\..*_proj"], "weights": {"num_bits": 8, "strategy": "channel"}},
        "b": {
            "targets": ["re:.*attn\\..*_proj"],
            "weights": {"num_bits": 8, "strategy": "channel"},
        },
    }
    modifier = QuantizationModifier(config_groups=groups, ignore=["lm_haed", "lm_head"])
    with warnings_logged() as warnings:
        CompressionSession().initialize(recipe=modifier, model=tiny_llama())
    typos = [w for w in warnings if "ignore: 'lm_haed' matches no module" in w]
    assert len(typos) == 1 and "QuantizationModifier" in typos[0]
    assert not any("'lm_head' matches no module" in w for w in warnings)
