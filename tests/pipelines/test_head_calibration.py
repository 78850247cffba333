"""The model's tail (final norm and LM head) is calibrated after the last block.

GPTQ, SparseGPT and Wanda on ``lm_head`` see the final norm's outputs on the compressed
blocks' hidden states (padding left out), in the sequential, basic and data-free pipelines, in
one process or two; a tied ``lm_head`` is untied first, and a failure leaves the head as it was.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from calibration_runs import calibrate_tiny_decoder
from export_models import QUIET
from loguru import logger
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress import oneshot
from lightning_compress.bundled import TinyDecoderConfig
from lightning_compress.core import CompressionSession
from lightning_compress.core.compression_record import RECORD_ATTRIBUTE
from lightning_compress.modifiers import (
    GPTQModifier,
    QuantizationModifier,
    SmoothQuantModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.gptq import gptq_quantize
from lightning_compress.pipelines import (
    BasicPipeline,
    DataFreePipeline,
    PipelineOptions,
    SequentialPipeline,
)
from lightning_compress.summary import CompressionSummary

W8_CHANNEL = {"num_bits": 8, "strategy": "channel"}
GPTQ_W8 = {"group_0": {"targets": ["Linear"], "weights": W8_CHANNEL}}
HEAD_ARCHITECTURES = ["tiny_decoder", "llama", "opt", "gpt2"]


def calibrate(model: nn.Module, recipe: Any, batches: list, pipeline: type = SequentialPipeline):
    session = CompressionSession()
    session.initialize(recipe=recipe, model=model)
    pipeline(model, session, PipelineOptions())(batches)
    session.finalize()
    return session


def head_inputs(model: nn.Module, batches: list) -> torch.Tensor:
    """The rows ``lm_head`` reads in a plain forward of ``model``, padded tokens left out."""
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        seen.append(args[0])

    # first: an input quantizer on lm_head must not change what is recorded
    handle = model.lm_head.register_forward_pre_hook(record, prepend=True)
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    handle.remove()
    rows = []
    for x, batch in zip(seen, batches, strict=True):
        x = x.double().reshape(-1, x.shape[-1])
        mask = batch.get("attention_mask")
        rows.append(x if mask is None else x[mask.reshape(-1).bool()])
    return torch.cat(rows)


def count_forwards(module: nn.Module) -> list[int]:
    """Counts calls of ``module`` without a hook (a hook would make the module observed)."""
    calls = [0]
    forward = module.forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


@contextmanager
def warnings_logged() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="WARNING")
    try:
        yield messages
    finally:
        logger.remove(sink)


# ------------------------------------------------------------------- against the math
@pytest.mark.parametrize("architecture", HEAD_ARCHITECTURES)
def test_gptq_quantizes_lm_head_from_the_final_norm_outputs(tiny_lm, token_batches):
    original = copy.deepcopy(tiny_lm.lm_head.weight.detach())
    calibrate(tiny_lm, GPTQModifier(config_groups=GPTQ_W8), token_batches)

    x = head_inputs(tiny_lm, token_batches)  # the compressed blocks' hidden states, normed
    hessian = 2 / x.shape[0] * x.T @ x
    args = QuantizationArgs(**W8_CHANNEL)
    expected = gptq_quantize(original, hessian.float(), args, actorder="static")
    head = tiny_lm.lm_head
    assert torch.equal(head.weight_scale, expected.scale)
    # H summed in another order may move a value across a rounding boundary: one step at most
    steps = ((head.weight - expected.weight_q) / head.weight_scale).abs()
    assert steps.max() <= 1 + 1e-4
    assert (steps > 0.5).float().mean() < 0.01


def assert_wanda_prunes_lm_head_by_its_input_norms(model: nn.Module, batches: list) -> None:
    original = copy.deepcopy(model.lm_head.weight.detach())
    calibrate(model, WandaPruningModifier(sparsity=0.5), batches)

    norms = head_inputs(model, batches).square().sum(0).sqrt()
    scores = original.double().abs() * norms
    pruned = scores.argsort(dim=1)[:, : original.shape[1] // 2]
    expected = original.clone().scatter_(1, pruned, 0.0)
    assert torch.equal(model.lm_head.weight, expected)


def test_wanda_prunes_lm_head_by_the_final_norm_output_norms(tiny_lm, token_batches):
    assert_wanda_prunes_lm_head_by_its_input_norms(tiny_lm, token_batches)


class TupleBlock(nn.Module):
    """A residual block that returns ``(hidden_states, None)``, as older decoder layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, None]:
        return hidden_states + self.proj(hidden_states), None


class TupleModel(nn.Module):
    """Embedding, two tuple-returning blocks, a final norm and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 16)
        self.layers = nn.ModuleList([TupleBlock(), TupleBlock()])
        self.norm = nn.LayerNorm(16)
        self.lm_head = nn.Linear(16, 32, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed(input_ids)
        for layer in self.layers:
            hidden_states = layer(hidden_states)[0]
        return self.lm_head(self.norm(hidden_states))


def test_blocks_returning_tuples_feed_the_head_their_hidden_states():
    torch.manual_seed(0)
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    assert_wanda_prunes_lm_head_by_its_input_norms(TupleModel(), [{"input_ids": ids}])


@pytest.mark.parametrize("architecture", ["llama"])
def test_sparsegpt_prunes_half_of_lm_head_and_updates_the_rest(tiny_lm, token_batches):
    original = copy.deepcopy(tiny_lm.lm_head.weight.detach())
    calibrate(tiny_lm, SparseGPTModifier(sparsity=0.5, mask_structure="0:0"), token_batches)
    weight = tiny_lm.lm_head.weight
    assert (weight == 0).sum().item() == weight.numel() // 2
    kept = weight != 0
    assert not torch.equal(weight[kept], original[kept])  # the error spread onto the others


@pytest.mark.parametrize("architecture", ["llama"])
def test_a_static_input_observer_calibrates_lm_head(tiny_lm, token_batches):
    w8a8 = {"weights": W8_CHANNEL, "input_activations": {"num_bits": 8, "strategy": "tensor"}}
    recipe = QuantizationModifier(config_groups={"group_0": {"targets": ["Linear"], **w8a8}})
    calibrate(tiny_lm, recipe, token_batches)
    largest = head_inputs(tiny_lm, token_batches).abs().max()
    assert 0 < tiny_lm.lm_head.input_scale.item() <= largest.item() / 127 * (1 + 1e-6)


# ------------------------------------------------------------------- other pipelines
@pytest.mark.parametrize("architecture", ["llama"])
def test_basic_pipeline_quantizes_lm_head_on_the_whole_forward(tiny_lm, token_batches):
    calibrate(tiny_lm, GPTQModifier(config_groups=GPTQ_W8), token_batches, BasicPipeline)
    assert tiny_lm.lm_head.quantization_scheme is not None


@pytest.mark.parametrize("architecture", ["llama"])
def test_data_free_pipeline_quantizes_lm_head_to_nearest(tiny_lm):
    calibrate(tiny_lm, QuantizationModifier(config_groups=GPTQ_W8), [], DataFreePipeline)
    assert tiny_lm.lm_head.quantization_scheme is not None


# ------------------------------------------------------------------- what runs
@pytest.mark.parametrize("architecture", ["llama"])
def test_an_ignored_lm_head_does_not_run(tiny_lm, token_batches):
    calls = count_forwards(tiny_lm.lm_head)
    calibrate(tiny_lm, GPTQModifier(config_groups=GPTQ_W8, ignore=["lm_head"]), token_batches)
    assert calls == [0]
    assert not hasattr(tiny_lm.lm_head, "quantization_scheme")


@pytest.mark.parametrize("architecture", ["llama"])
def test_the_tail_runs_once_per_batch_and_leaves_no_hook(tiny_lm, token_batches):
    calls = count_forwards(tiny_lm.lm_head)
    embeddings = count_forwards(tiny_lm.model.embed_tokens)
    calibrate(tiny_lm, GPTQModifier(config_groups=GPTQ_W8), token_batches)
    assert calls == [len(token_batches)]
    assert embeddings == [2 * len(token_batches)]  # the block inputs, then the tail
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_lm.modules())
    assert "forward" not in vars(tiny_lm.model.layers[0])


@pytest.mark.parametrize("architecture", ["llama"])
def test_a_failure_in_the_tail_leaves_lm_head_as_it_was(tiny_lm, token_batches):
    original = copy.deepcopy(tiny_lm.lm_head.weight.detach())
    not_finite = tiny_lm.model.norm.register_forward_hook(lambda m, a, out: out * float("nan"))
    session = CompressionSession()
    session.initialize(recipe=GPTQModifier(config_groups=GPTQ_W8), model=tiny_lm)
    pipeline = SequentialPipeline(tiny_lm, session, PipelineOptions())
    with pytest.raises(ValueError, match="lm_head"):
        pipeline(token_batches)
    not_finite.remove()
    assert torch.equal(tiny_lm.lm_head.weight, original)
    assert not hasattr(tiny_lm.lm_head, "quantization_scheme")
    assert set(dict(tiny_lm.lm_head.named_buffers())) == set()
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in tiny_lm.modules())
    assert getattr(tiny_lm, RECORD_ATTRIBUTE).compressed == ("model.layers.0", "model.layers.1")


@pytest.mark.parametrize("architecture", ["llama"])
@pytest.mark.parametrize(
    "modifier",
    [
        GPTQModifier(config_groups=GPTQ_W8),
        SparseGPTModifier(sparsity=0.5),
        WandaPruningModifier(sparsity=0.5),
    ],
    ids=["gptq", "sparsegpt", "wanda"],
)
def test_a_targeted_layer_the_forward_never_calls_is_named_and_falls_back(
    tiny_lm, token_batches, modifier
):
    tiny_lm.unused = nn.Linear(64, 64)
    with warnings_logged() as messages:
        calibrate(tiny_lm, modifier, token_batches)
    (warning,) = [message for message in messages if "['unused']" in message]
    assert "fewer than 1 calibration token(s)" in warning


# ------------------------------------------------------------------- recipes and ties
def tiny_llama(tie: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def token_ids() -> torch.Tensor:
    return torch.randint(3, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def test_smoothquant_and_gptq_w8a8_quantize_lm_head_with_static_inputs_in_the_summary():
    model = tiny_llama()
    summary = CompressionSummary()
    w8a8 = {"weights": {"num_bits": 8}, "input_activations": {"num_bits": 8}}
    recipe = [
        SmoothQuantModifier(smoothing_strength=0.6),
        GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], **w8a8}}),
    ]
    oneshot(model, recipe, token_ids(), None, trainer_kwargs=QUIET, progress=False, summary=summary)
    assert "lm_head" in summary.quantized
    assert model.lm_head.input_scale.isfinite().all() and model.lm_head.input_scale > 0
    assert "lm_head" not in summary.left_out


def test_a_tied_lm_head_is_untied_with_a_warning_and_the_embedding_kept():
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embedding = copy.deepcopy(model.model.embed_tokens.weight.detach())
    with warnings_logged() as messages:
        oneshot(model, GPTQModifier(config_groups=GPTQ_W8), token_ids(), None, trainer_kwargs=QUIET)
    assert any("'lm_head' shares its weight" in message for message in messages)
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    assert not torch.equal(model.lm_head.weight, embedding)
    assert model.config.tie_word_embeddings is False


# ------------------------------------------------------------------- two processes
def calibrate_head(directory: Path, **trainer_kwargs: Any) -> None:
    config = TinyDecoderConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=64
    )
    recipe = GPTQModifier(config_groups=GPTQ_W8, actorder="weight")
    calibrate_tiny_decoder(directory, recipe, config, **trainer_kwargs)


@pytest.mark.distributed
def test_two_ranks_quantize_lm_head_like_one_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    single.mkdir()
    ddp.mkdir()
    calibrate_head(single, devices=1)
    calibrate_head(ddp, devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    assert "lm_head.weight_scale" in expected
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.allclose(tensor, expected[name], rtol=0, atol=1e-6), name
