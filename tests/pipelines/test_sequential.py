"""The sequential pipeline: exact on every architecture, compressed outputs flow, clean-up."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from loguru import logger
from torch import nn

from lightning_compress.core import CompressionSession, Event, EventType, State
from lightning_compress.modifiers import Modifier
from lightning_compress.pipelines import (
    PipelineOptions,
    SequentialPipeline,
    call_model,
    find_blocks,
    hidden_states_of,
)

START, SEQ, END = (
    EventType.CALIBRATION_EPOCH_START,
    EventType.SEQUENTIAL_EPOCH_END,
    EventType.CALIBRATION_EPOCH_END,
)


class EventLog(Modifier):
    """Records the calibration events and the subgraph of each SEQUENTIAL_EPOCH_END."""

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.events: list[EventType] = []
        self.subgraphs: list[nn.Module] = []

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        self.events.append(event.type_)
        if event.type_ == SEQ:
            self.subgraphs.append(kwargs["subgraph"])


class ZeroBlocks(Modifier):
    """Zeroes the weights (norms excepted) of the blocks ``zero`` at their SEQUENTIAL_EPOCH_END.

    ``observe`` puts counting forward hooks on every block's submodules; ``fail_at`` zeroes
    one weight of that block and then raises.
    """

    zero: list[int] = dataclasses.field(default_factory=list)
    observe: bool = False
    fail_at: int | None = None

    def on_initialize(self, state: State, **kwargs: Any) -> None:
        self.blocks = [block for _, block in find_blocks(state.model)]
        self.hook_calls = 0
        if self.observe:
            for block in self.blocks:
                for module in block.modules():
                    if module is not block:
                        self.register_hook(module, self._count, "forward")

    def _count(self, module: nn.Module, args: Any, output: Any) -> None:
        self.hook_calls += 1

    def on_event(self, state: State, event: Event, **kwargs: Any) -> None:
        if event.type_ != SEQ:
            return
        index = next(i for i, block in enumerate(self.blocks) if block is kwargs["subgraph"])
        weights = [p for name, p in self.blocks[index].named_parameters() if "norm" not in name]
        with torch.no_grad():
            if index == self.fail_at:
                weights[0].zero_()
                raise RuntimeError(f"injected failure in block {index}")
            if index in self.zero:
                for weight in weights:
                    weight.zero_()


@dataclasses.dataclass
class Run:
    """What a calibration run left: the session, forwards per block, inputs after each block."""

    session: CompressionSession
    forwards: list[int]
    next_inputs: list[list[torch.Tensor]]


def calibrate(model: nn.Module, recipe: Any, batches: list, **options: Any) -> Run:
    session = CompressionSession()
    session.initialize(recipe=recipe, model=model)
    run = Run(session, [], [])
    pipeline = SequentialPipeline(model, session, PipelineOptions(**options))

    def on_block_end(report: Any) -> None:
        run.forwards.append(report.forwards)
        cache = pipeline.cache
        run.next_inputs.append([cache.inputs(i).hidden_states for i in range(len(cache))])

    pipeline.options.on_block_end = on_block_end
    pipeline(batches)
    session.finalize()
    return run


def record_outputs(block: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    block.register_forward_hook(lambda module, args, out: seen.append(hidden_states_of(out)))
    return seen


def all_hooks(model: nn.Module) -> list[Any]:
    return [
        hook
        for module in model.modules()
        for hooks in (module._forward_hooks, module._forward_pre_hooks)
        for hook in hooks.values()
    ]


def test_identity_recipe_reproduces_the_model_on_every_architecture(tiny_lm, token_batches):
    last = find_blocks(tiny_lm)[-1][1]
    expected = record_outputs(last)
    with torch.no_grad():
        for batch in token_batches:
            call_model(tiny_lm, batch)
    last._forward_hooks.clear()
    seen = record_outputs(last)
    run = calibrate(tiny_lm, EventLog(), token_batches)
    assert run.forwards == [1, 1]
    assert len(seen) == len(expected) == len(token_batches)
    for got, want in zip(seen, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


def test_events_come_in_order_with_each_block_as_subgraph(tiny_lm, token_batches):
    run = calibrate(tiny_lm, EventLog(), token_batches)
    (log,) = run.session.lifecycle.recipe.modifiers
    assert log.events == [START, SEQ, SEQ, END]
    assert [id(s) for s in log.subgraphs] == [id(b) for _, b in find_blocks(tiny_lm)]


@pytest.mark.parametrize("architecture", ["tiny_decoder"])
@pytest.mark.parametrize("observe", [False, True])
def test_next_block_receives_the_compressed_block_outputs(tiny_lm, token_batches, observe):
    embeddings = [tiny_lm.model.embed_tokens(batch["input_ids"]) for batch in token_batches]
    run = calibrate(tiny_lm, ZeroBlocks(zero=[0], observe=observe), token_batches)
    # A zeroed decoder layer is the identity (residuals only): block 1 gets block 0's input.
    for got, want in zip(run.next_inputs[0], embeddings, strict=True):
        assert torch.equal(got, want)
    # Unobserved: compress, then one forward. Observed and changed: a second forward.
    assert run.forwards == ([2, 1] if observe else [1, 1])
    (modifier,) = run.session.lifecycle.recipe.modifiers
    submodules = sum(1 for _ in tiny_lm.model.layers[0].modules()) - 1
    # The observers see the calibration forward only, never the propagation.
    assert modifier.hook_calls == (2 * len(token_batches) * submodules if observe else 0)


@pytest.mark.parametrize("architecture", ["tiny_decoder"])
def test_without_propagation_one_forward_feeds_the_uncompressed_outputs(tiny_lm, token_batches):
    embeddings = [tiny_lm.model.embed_tokens(batch["input_ids"]) for batch in token_batches]
    recipe = ZeroBlocks(zero=[0], observe=True)
    run = calibrate(tiny_lm, recipe, token_batches, propagate_compressed=False)
    assert run.forwards == [1, 1]
    assert not any(torch.equal(a, b) for a, b in zip(run.next_inputs[0], embeddings, strict=True))


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_spilling_to_disk_gives_identical_results(tiny_lm, token_batches, tmp_path):
    in_memory = calibrate(tiny_lm, ZeroBlocks(observe=True), token_batches)
    spill = tmp_path / "spill"
    spilled = calibrate(tiny_lm, ZeroBlocks(observe=True), token_batches, offload_dir=spill)
    for memory_block, disk_block in zip(in_memory.next_inputs, spilled.next_inputs, strict=True):
        for got, want in zip(disk_block, memory_block, strict=True):
            assert torch.equal(got, want)
    assert spill.is_dir() and not any(spill.iterdir())  # the spill directory is removed


@pytest.mark.parametrize("architecture", ["tiny_decoder", "opt"])
def test_an_error_removes_every_hook_and_restores_the_failing_block(tiny_lm, token_batches):
    before = {name: p.detach().clone() for name, p in tiny_lm.named_parameters()}
    tiny_lm.train()
    recipe = ZeroBlocks(zero=[0], fail_at=1, observe=True)
    with pytest.raises(RuntimeError, match="injected failure in block 1"):
        calibrate(tiny_lm, recipe, token_batches)
    assert all_hooks(tiny_lm) == []
    assert all(module.training for module in tiny_lm.modules())
    (first, _), (second, _) = find_blocks(tiny_lm)
    for name, param in tiny_lm.named_parameters():
        if name.startswith(f"{second}.") or not name.startswith(f"{first}."):
            assert torch.equal(param, before[name]), name  # the failing block is unchanged
        elif "norm" not in name:
            assert not param.any(), name  # the block before it stays compressed


@pytest.mark.parametrize("architecture", ["tiny_decoder"])
def test_progress_logs_each_block_with_the_time_left(tiny_lm, token_batches):
    messages: list[str] = []
    sink = logger.add(lambda message: messages.append(message.record["message"]), level="INFO")
    try:
        calibrate(tiny_lm, EventLog(), token_batches, progress=True)
        calibrate(tiny_lm, EventLog(), token_batches, progress=False)
    finally:
        logger.remove(sink)
    lines = [message for message in messages if message.startswith("Block ")]
    assert [line.split(" done in ")[0] for line in lines] == [
        "Block 1/2 (model.layers.0)",
        "Block 2/2 (model.layers.1)",
    ]
    assert lines[0].endswith(" left") and lines[1].endswith("about 0.0 s left")
