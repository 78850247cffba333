"""Two CPU processes (ddp_fork, gloo): each GPTQ / SparseGPT layer and each AWQ mapping is
solved on one rank only (a layer too costly for one rank: in row slices on both, its Hessian
factored by both together where it is large enough for tiles), its result broadcast, and the
ranks end with the weights of one process, bit for bit."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from calibration_runs import calibrate_tiny_decoder
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_compress.bundled import TinyDecoderConfig
from lightning_compress.modifiers import GPTQModifier, Modifier, tiled_cholesky
from lightning_compress.modifiers.pruning import SparseGPTModifier
from lightning_compress.modifiers.smoothing import AWQModifier

pytestmark = pytest.mark.distributed

CONFIG = TinyDecoderConfig(
    hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, vocab_size=64
)
SOLVED: list[str] = []  # the layers this process solved (each forked rank has its own copy)
FAILING = "k_proj"
QUANTIZE = GPTQModifier.compress_stack
WIDE = TinyDecoderConfig(  # down_proj [128, 512]: alone in its group, most of a block's solve
    hidden_size=128, intermediate_size=512, num_layers=2, num_heads=4, vocab_size=64
)
COMPUTE_LAYERS = GPTQModifier.compute_layers
FACTOR_TILES = tiled_cholesky._Tiles.factor
SLICE = GPTQModifier.compress_rows


def counting(method: Callable[..., Any]) -> Callable[..., Any]:
    """``compress_stack`` recording the layers it solves in ``SOLVED``."""

    def compress_stack(self: Modifier, stack: list[str], statistics: Any) -> Any:
        SOLVED.extend(stack)
        return method(self, stack, statistics)

    return compress_stack


def counting_slices(method: Callable[..., Any]) -> Callable[..., Any]:
    """``compress_rows`` recording each slice it solves in ``SOLVED``."""

    def compress_rows(self: Modifier, name: str, statistics: Any, rows: tuple[int, int]) -> Any:
        SOLVED.append(f"{name}[{rows[0]}:{rows[1]}]")
        return method(self, name, statistics, rows)

    return compress_rows


def counting_tiles(method: Callable[..., Any]) -> Callable[..., Any]:
    """A tiled factorization recording in ``SOLVED`` how many ranks share it."""

    def factor(self: Any) -> Any:
        SOLVED.append(f"tiles on {self.world_size} rank(s)")
        return method(self)

    return factor


def counting_searches(method: Callable[..., Any]) -> Callable[..., Any]:
    """AWQ's ``_search`` recording each search in ``SOLVED``."""

    def search(self: Modifier, inputs: Any) -> Any:
        SOLVED.append("AWQ search")
        return method(self, inputs)

    return search


def failing_on_k_proj(self: Modifier, stack: list[str], statistics: Any) -> Any:
    """``compress_stack`` failing on the rank that solves the k_proj layers."""
    names = [name for name in stack if name.endswith(FAILING)]
    if names:
        raise ValueError(f"cannot quantize {names}")
    return QUANTIZE(self, stack, statistics)


class RecordSolved(Callback):
    """Every rank writes the layers it solved."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        path = self.directory / f"solved{trainer.global_rank}.json"
        path.write_text(json.dumps(SOLVED))


def failing_slice(when: str) -> Callable[..., Any]:
    """``compress_rows`` failing on rank 1 for the first down_proj's slice, ``when`` "before"
    or "after" the ranks factor its Hessian together."""

    def compress_rows(self: Modifier, name: str, statistics: Any, rows: tuple[int, int]) -> Any:
        failing = dist.get_rank() == 1 and name == "model.layers.0.mlp.down_proj"
        if failing and when == "before":
            raise MemoryError(f"rank 1 ran out of memory before factoring {name}")
        result = SLICE(self, name, statistics, rows)
        if failing:
            raise MemoryError(f"rank 1 ran out of memory after factoring {name}")
        return result

    return compress_rows


def recording_errors(directory: Path) -> Callable[..., Any]:
    """``compute_layers`` writing the error it raises on each rank to ``error<rank>.txt``,
    then waiting (at most 60 s) for the other rank to get there too."""

    def compute_layers(self: Modifier, state: Any, names: list[str]) -> Any:
        try:
            return COMPUTE_LAYERS(self, state, names)
        except Exception as error:
            rank = dist.get_rank()
            (directory / f"error{rank}.txt").write_text(f"{type(error).__name__}: {error}")
            dist.monitored_barrier(timeout=timedelta(seconds=60))
            raise

    return compute_layers


def recipe() -> list[Modifier]:
    """GPTQ with activation-order groups on q/k/v and gate/up (stacked layers sharing a
    Hessian, split between the ranks); SparseGPT 2:4 on o and down."""
    weights = {"num_bits": 4, "strategy": "group", "group_size": 32}
    return [
        GPTQModifier(
            config_groups={"w4": {"targets": [r"re:.*(q|k|v|gate|up)_proj$"], "weights": weights}},
            actorder="group",
        ),
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=[r"re:.*(o|down)_proj$"]),
    ]


def calibrate(directory: Path, modifiers: list[Modifier], **trainer_kwargs: Any) -> None:
    directory.mkdir()
    SOLVED.clear()
    callbacks = [RecordSolved(directory)]
    calibrate_tiny_decoder(directory, modifiers, CONFIG, callbacks=callbacks, **trainer_kwargs)


def test_two_ranks_solve_each_layer_once_and_end_like_one_process(tmp_path, monkeypatch):
    for modifier in (GPTQModifier, SparseGPTModifier):
        monkeypatch.setattr(modifier, "compress_stack", counting(modifier.compress_stack))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    calibrate(single, recipe(), devices=1)  # on one thread, as each DDP worker
    calibrate(ddp, recipe(), devices=2, strategy="ddp_fork")

    expected = torch.load(single / "rank0.pt", weights_only=True)
    assert "model.layers.1.self_attn.q_proj.weight_g_idx" in expected
    layers = json.loads((single / "solved0.json").read_text())
    assert len(layers) == len(set(layers)) == 2 * 7
    solved = [json.loads((ddp / f"solved{rank}.json").read_text()) for rank in (0, 1)]
    assert sorted(solved[0] + solved[1]) == sorted(layers)  # each layer once, on one rank
    assert solved[0] and solved[1]
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), name  # same Hessians: same solve


def test_two_ranks_search_each_awq_mapping_once_and_end_like_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(AWQModifier, "_search", counting_searches(AWQModifier._search))
    weights = {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 32}
    groups = {"w4": {"targets": ["Linear"], "weights": weights}}

    def awq_then_gptq() -> list[Modifier]:
        return [AWQModifier(weights=weights), GPTQModifier(config_groups=groups)]

    single, ddp = tmp_path / "single", tmp_path / "ddp"
    calibrate(single, awq_then_gptq(), devices=1)
    calibrate(ddp, awq_then_gptq(), devices=2, strategy="ddp_fork")

    searches = [json.loads((ddp / f"solved{rank}.json").read_text()) for rank in (0, 1)]
    mappings = 2 * 3  # per block: norm -> q/k/v, norm -> gate/up, up -> down
    assert json.loads((single / "solved0.json").read_text()) == ["AWQ search"] * mappings
    assert searches[0] and searches[1] and len(searches[0] + searches[1]) == mappings
    expected = torch.load(single / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), name


def test_an_error_on_the_owner_rank_is_raised_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setattr(GPTQModifier, "compress_stack", failing_on_k_proj)
    monkeypatch.setattr(GPTQModifier, "compute_layers", recording_errors(tmp_path / "ddp"))
    weights = {"num_bits": 4, "strategy": "channel"}
    modifiers = [GPTQModifier(config_groups={"w4": {"targets": ["Linear"], "weights": weights}})]
    with pytest.raises(Exception, match="cannot quantize"):
        calibrate(tmp_path / "ddp", modifiers, devices=2, strategy="ddp_fork")
    errors = [(tmp_path / "ddp" / f"error{rank}.txt").read_text() for rank in (0, 1)]
    assert errors[0] == errors[1]
    assert errors[0].startswith("ValueError: cannot quantize ['model.layers.0.self_attn.k_proj'")


@pytest.mark.parametrize("factorization", ["lapack", "tiles"])
def test_a_layer_too_costly_for_one_rank_is_solved_in_row_slices_like_one_process(
    tmp_path, monkeypatch, factorization
):
    for modifier in (GPTQModifier, SparseGPTModifier):
        monkeypatch.setattr(modifier, "compress_stack", counting(modifier.compress_stack))
        monkeypatch.setattr(modifier, "compress_rows", counting_slices(modifier.compress_rows))
    if factorization == "tiles":  # down_proj's Hessian (512 inputs) in tiles of 64
        monkeypatch.setattr(tiled_cholesky, "TILED_FROM", 256)
        monkeypatch.setattr(tiled_cholesky, "FACTOR_TILE", 64)
        monkeypatch.setattr(tiled_cholesky._Tiles, "factor", counting_tiles(FACTOR_TILES))
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    calibrate_wide_decoder(single, devices=1)
    calibrate_wide_decoder(ddp, devices=2, strategy="ddp_fork")

    alone = json.loads((single / "solved0.json").read_text())
    assert not any("[" in layer for layer in alone)
    solved = [json.loads((ddp / f"solved{rank}.json").read_text()) for rank in (0, 1)]
    for block in (0, 1):  # each down_proj: half of its rows on each rank, solved once
        down = f"model.layers.{block}.mlp.down_proj"
        assert [s for s in solved[0] if s.startswith(down)] == [f"{down}[0:64]"]
        assert [s for s in solved[1] if s.startswith(down)] == [f"{down}[64:128]"]
    tiled = {"lapack": 0, "tiles": 2}[factorization]  # the two down_proj Hessians
    assert [s for s in alone if s.startswith("tiles")] == ["tiles on 1 rank(s)"] * tiled
    for rank in (0, 1):  # each factored by the two ranks together
        assert [s for s in solved[rank] if s.startswith("tiles")] == ["tiles on 2 rank(s)"] * tiled
    expected = torch.load(single / "rank0.pt", weights_only=True)
    for rank in (0, 1):
        state = torch.load(ddp / f"rank{rank}.pt", weights_only=True)
        assert state.keys() == expected.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, expected[name]), name  # slices of one sweep, bit for bit


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_rank_failing_around_a_shared_factorization_fails_every_rank(tmp_path, monkeypatch, when):
    monkeypatch.setattr(tiled_cholesky, "TILED_FROM", 256)  # down_proj's Hessian in tiles
    monkeypatch.setattr(tiled_cholesky, "FACTOR_TILE", 64)
    monkeypatch.setattr(tiled_cholesky._Tiles, "factor", counting_tiles(FACTOR_TILES))
    monkeypatch.setattr(GPTQModifier, "compress_rows", failing_slice(when))
    monkeypatch.setattr(GPTQModifier, "compute_layers", recording_errors(tmp_path / "ddp"))
    with pytest.raises(Exception, match=f"rank 1 ran out of memory {when} factoring"):
        calibrate_wide_decoder(tmp_path / "ddp", devices=2, strategy="ddp_fork")
    errors = [(tmp_path / "ddp" / f"error{rank}.txt").read_text() for rank in (0, 1)]
    # rank 0 stopped at the agreement that followed rank 1's failure, instead of waiting in
    # the factorization for rank 1's panels (before) or in the next collective (after)
    assert errors[0] == errors[1]
    assert errors[0].startswith(f"MemoryError: rank 1 ran out of memory {when} factoring")


def calibrate_wide_decoder(directory: Path, **kwargs: Any) -> None:
    """GPTQ W4 g32 on the ``WIDE`` decoder but the last down_proj, which SparseGPT prunes
    2:4, recording what each rank solved."""
    directory.mkdir()
    SOLVED.clear()
    pruned = "model.layers.1.mlp.down_proj"
    weights = {"num_bits": 4, "strategy": "group", "group_size": 32}
    modifiers = [
        GPTQModifier(
            config_groups={"w4": {"targets": ["Linear"], "weights": weights}},
            ignore=["lm_head", pruned],
        ),
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=[pruned]),
    ]
    callbacks = [RecordSolved(directory)]
    calibrate_tiny_decoder(directory, modifiers, WIDE, callbacks=callbacks, **kwargs)
