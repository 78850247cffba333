"""Which rank solves which layer, the helpers' behaviour in one process, and the inversion
shared by 2 gloo processes (the DDP test, tests/lightning/test_weight_parallel_ddp.py, runs
whole calibrations on 2 ranks)."""

from __future__ import annotations

import itertools
import multiprocessing
import pickle
from itertools import product
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from lightning_compress.core.distributed import (
    all_gather_or_raise,
    balanced_owners,
    broadcast_tensors_,
)
from lightning_compress.modifiers import GPTQModifier, layerwise_split
from lightning_compress.modifiers.hessian import (
    damp_and_invert,
    factor_inverses_by,
    lower_triangular_inverse,
)
from lightning_compress.modifiers.layerwise_modifier import PendingLayer
from lightning_compress.modifiers.layerwise_split import (
    FACTOR,
    INVERSE,
    PER_COLUMN,
    ROW_ALIGN,
    CompressedLayer,
    OwnedStack,
    StackOutcome,
    assign_owners,
    join_row_slices,
    row_bounds,
    share_outcomes,
    shared_triangular_inverse,
    solve_cost,
)
from lightning_compress.modifiers.pruning import SparseGPTModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme


def best_makespan(costs: list[float], world_size: int) -> float:
    """The smallest largest load over every assignment (brute force)."""
    loads = (
        max(sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size))
        for owners in product(range(world_size), repeat=len(costs))
    )
    return min(loads)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_balanced_owners_stay_within_the_greedy_bound_of_the_best_split(world_size):
    generator = torch.Generator().manual_seed(world_size)
    for _ in range(20):
        costs = torch.randint(1, 100, (7,), generator=generator).tolist()
        owners = balanced_owners(costs, world_size)
        loads = [
            sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(world_size)
        ]
        # longest-processing-time first is within 4/3 - 1/(3m) of the optimum
        bound = (4 / 3 - 1 / (3 * world_size)) * best_makespan(costs, world_size)
        assert max(loads) <= bound + 1e-9


def test_balanced_owners_depend_on_the_costs_alone_and_break_ties_by_order():
    assert balanced_owners([5.0, 5.0, 5.0, 5.0], 2) == [0, 1, 0, 1]
    assert balanced_owners([1.0, 9.0, 4.0, 4.0], 2) == [1, 0, 1, 1]
    assert balanced_owners([], 3) == []


def test_balanced_owners_refuse_bad_arguments():
    with pytest.raises(ValueError, match="world_size: expected an int >= 1, got 0"):
        balanced_owners([1.0], 0)
    with pytest.raises(ValueError, match="costs: expected values >= 0"):
        balanced_owners([1.0, -1.0], 2)


def test_solve_cost_counts_the_sweep_its_columns_and_the_inversion():
    assert solve_cost(3, 2) == 3 * 2 * 2 + PER_COLUMN * 2 + (FACTOR + INVERSE) * 2**3


def test_divisible_stacks_are_split_by_layer_and_the_parts_kept_in_stack_order():
    shapes = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "g": (128, 64)}
    stacks = [["q", "k", "v"], ["o"], ["g"]]
    plan = assign_owners(stacks, shapes, lambda stack: stack != ["g"], 2)
    # costs: g, then q and o, then k and v: g -> 0, q -> 1, o -> 1, k -> 0, v -> 1
    assert plan == [
        OwnedStack(["k"], 0),
        OwnedStack(["q", "v"], 1),
        OwnedStack(["o"], 1),
        OwnedStack(["g"], 0),
    ]
    whole = assign_owners(stacks, shapes, lambda stack: False, 2)
    assert [part.names for part in whole] == stacks
    assert assign_owners(stacks, shapes, lambda stack: True, 1) == [
        OwnedStack(stack, 0) for stack in stacks
    ]


BLOCK = {  # a decoder block of hidden 1024, MLP 2816, 16 / 4 heads: weight shapes
    "q": (1024, 1024),
    "k": (256, 1024),
    "v": (256, 1024),
    "o": (1024, 1024),
    "gate": (2816, 1024),
    "up": (2816, 1024),
    "down": (1024, 2816),
}


def test_a_dominant_layer_shares_its_inversion_and_is_cut_into_one_slice_per_rank():
    for world_size, starts in ((2, [0, 512]), (3, [0, 320, 704]), (4, [0, 256, 512, 768])):
        plan = assign_owners([["down"]], BLOCK, bool, world_size, bool)
        assert [part.rows[0] for part in plan] == starts
        assert [part.owner for part in plan] == list(range(world_size))  # one slice per rank
        assert all(part.shared for part in plan)
    # not allowed in rows: whole, its inversion shared
    assert assign_owners([["down"]], BLOCK, bool, 2) == [OwnedStack(["down"], 0, None, True)]
    # one rank: nothing to share
    assert assign_owners([["down"]], BLOCK, bool, 1, bool) == [OwnedStack(["down"], 0)]


def test_a_layer_of_few_rows_stays_whole_where_slices_would_repeat_the_sweeps_column_work():
    narrow = {"narrow": (128, 1024)}
    assert assign_owners([["narrow"]], narrow, bool, 2, bool) == [OwnedStack(["narrow"], 0)]


def test_a_whole_block_shares_the_dominant_inversion_and_puts_the_rest_on_the_other_rank():
    stacks = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
    plan = assign_owners(stacks, BLOCK, bool, 2, bool)
    assert plan == [
        OwnedStack(["q", "k", "v"], 1),
        OwnedStack(["o"], 1),
        OwnedStack(["gate", "up"], 1),
        OwnedStack(["down"], 0, None, True),
    ]


def test_in_one_process_the_helpers_return_what_they_are_given_and_raise_the_error():
    assert all_gather_or_raise({"a": 1}, None) == [{"a": 1}]
    with pytest.raises(KeyError, match="boom"):
        all_gather_or_raise(None, KeyError("boom"))
    tensor = torch.ones(2)
    broadcast_tensors_([tensor], src=0)
    assert tensor.tolist() == [1.0, 1.0]
    outcome = StackOutcome({"q": CompressedLayer(torch.zeros(2, 2), {"s": torch.ones(2)})}, 0.5)
    plan = [OwnedStack(["q"], 0)]
    assert share_outcomes(plan, {0: outcome}, None, {"q": torch.device("cpu")}) == [outcome]


def test_an_error_that_cannot_be_pickled_travels_as_its_type_and_message():
    from lightning_compress.core.distributed import _portable

    class Local(ValueError):
        pass

    error = _portable(Local("the Hessian of layer 'q' is singular"))
    assert type(error) is RuntimeError
    assert str(error) == "Local: the Hessian of layer 'q' is singular"
    kept = _portable(ValueError("plain"))
    assert type(kept) is ValueError and pickle.dumps(kept)


def test_row_slices_start_on_aligned_rows_and_cover_the_layer():
    assert row_bounds(4096, 2) == [0, 2048, 4096]
    for rows, count in ((300, 3), (1000, 7), (128, 2), (64, 1)):
        bounds = row_bounds(rows, count)
        assert bounds[0] == 0 and bounds[-1] == rows and len(bounds) == count + 1
        assert all(a < b for a, b in itertools.pairwise(bounds))
        assert all(start % ROW_ALIGN == 0 for start in bounds[:-1])
    with pytest.raises(ValueError, match="count=3 is invalid for 128 rows"):
        row_bounds(128, 3)


def test_only_a_dominant_row_divisible_layer_is_split_each_slice_on_its_own_rank(monkeypatch):
    monkeypatch.setattr(layerwise_split, "PER_COLUMN", 0.0)  # products only
    monkeypatch.setattr(layerwise_split, "SHARING", 0.0)
    shapes = {"q": (128, 128), "o": (128, 128), "down": (1024, 256), "tiny": (256, 64)}
    stacks = [["q"], ["o"], ["down"], ["tiny"]]
    plan = assign_owners(stacks, shapes, lambda stack: True, 2, lambda name: name != "tiny")
    down = [part for part in plan if part.names == ["down"]]
    assert [(part.rows, part.owner) for part in down] == [((0, 512), 0), ((512, 1024), 1)]
    assert all(part.rows is None for part in plan if part.names != ["down"])
    # one rank, or no layer allowed: nothing is cut
    assert all(part.rows is None for part in assign_owners(stacks, shapes, bool, 1, bool))
    assert all(part.rows is None for part in assign_owners(stacks, shapes, bool, 2))


def test_gptq_splits_rows_only_for_per_row_qparams():
    modifier = GPTQModifier(scheme="W4A16")
    for strategy, expected in (("channel", True), ("group", True), ("tensor", False)):
        size = 32 if strategy == "group" else None
        weights = QuantizationArgs(num_bits=4, strategy=strategy, group_size=size)
        scheme = QuantizationScheme(["Linear"], weights, None, None)
        modifier._pending = {"layer": PendingLayer(torch.nn.Linear(64, 128), scheme)}
        assert modifier.row_divisible("layer") is expected, strategy


def test_sparsegpt_splits_rows_only_for_masks_chosen_per_row():
    layer = PendingLayer(torch.nn.Linear(64, 128), None)
    for settings, expected in (
        ({"sparsity": 0.5, "mask_structure": "2:4"}, True),
        ({"sparsity": 0.5}, False),  # an unstructured mask is chosen over all rows
        ({"sparsity": 0.5, "mask_structure": "2:4", "preserve_sparsity_mask": True}, False),
    ):
        modifier = SparseGPTModifier(targets=["Linear"], **settings)
        modifier._pending = {"layer": layer}
        assert modifier.row_divisible("layer") is expected, settings


def test_row_slices_are_joined_in_row_order_and_a_fallback_keeps_its_whole_layer():
    def outcome(value: float, rows: int, fallback: str | None = None) -> StackOutcome:
        layer = CompressedLayer(torch.full((rows, 2), value), {}, value)
        return StackOutcome({"d": layer}, 1.0, fallback)

    def join(name: str, slices: list[CompressedLayer]) -> CompressedLayer:
        return CompressedLayer(torch.cat([s.weight for s in slices]), {}, name)

    plan = [OwnedStack(["q"], 0), OwnedStack(["d"], 0, (64, 128)), OwnedStack(["d"], 1, (0, 64))]
    whole = StackOutcome({"q": CompressedLayer(torch.zeros(1, 2))}, 0.5)
    joined = join_row_slices(plan, [whole, outcome(2.0, 64), outcome(1.0, 64)], join)
    assert joined[0] is whole
    assert joined[1].seconds == 2.0 and joined[1].fallback is None
    weight = joined[1].results["d"].weight
    assert torch.equal(weight, torch.cat([torch.full((64, 2), 1.0), torch.full((64, 2), 2.0)]))
    fell = [whole, outcome(3.0, 128, "singular"), outcome(3.0, 128, "singular")]
    kept = join_row_slices(plan, fell, join)[1]
    assert kept.fallback == "singular" and kept.results["d"].weight.shape == (128, 2)


# --- the inversion shared by 2 gloo processes ---

SIZES = [200, 513, 777]  # one solve; halves once, odd; halves twice


def factors() -> list[torch.Tensor]:
    """Cholesky factors of the flipped, damped Hessians ``damp_and_invert`` would invert."""
    lowers = []
    for size in SIZES:
        x = torch.randn(2 * size, size, generator=torch.Generator().manual_seed(size))
        hessian = (x.T @ x / (2 * size)).flip(0, 1)
        hessian.diagonal().add_(0.01)
        lowers.append(torch.linalg.cholesky_ex(hessian)[0])  # column-major, as in the solve
    return lowers


def hessians() -> list[torch.Tensor]:
    """A positive definite Hessian and one that needs a larger dampening (rank 1)."""
    x = torch.randn(600, 300, generator=torch.Generator().manual_seed(3))
    low_rank = torch.randn(300, 1, generator=torch.Generator().manual_seed(4))
    return [x.T @ x / 600, low_rank @ low_rank.T - 0.05 * torch.eye(300)]


def shared_inversions(rank: int, directory: Path) -> None:
    """On 2 ranks: each factor's inverse with either rank as the root, and ``damp_and_invert``
    with rank 0 factoring, rank 1 receiving, then rank 1 factoring and rank 0 helping."""
    torch.set_num_threads(1)
    store = dist.FileStore(str(directory / "store"), 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    try:
        results = {}
        for root in (0, 1):
            for size, lower in zip(SIZES, factors(), strict=True):
                given = lower if rank == root else lower.new_empty(0)
                results[f"inverse {size} root {root}"] = shared_triangular_inverse(given, root)
        for index, hessian in enumerate(hessians()):
            inversion = layerwise_split._SharedInversion(0, torch.device("cpu"))
            role = inversion.as_root if rank == 0 else inversion.as_receiver
            with factor_inverses_by(role):
                inverse = damp_and_invert(hessian, 0.01)
            if rank == 0:
                inversion.finish(failed=False)
            else:
                layerwise_split.help_invert(inversion)
            results[f"upper {index}"] = (inverse.upper, inverse.dampening_frac)
            helped = layerwise_split._SharedInversion(1, torch.device("cpu"))
            if rank == 1:
                with factor_inverses_by(helped.as_root):
                    results[f"alone {index}"] = damp_and_invert(hessian, 0.01).upper
                helped.finish(failed=False)
            else:
                layerwise_split.help_invert(helped)
        torch.save(results, directory / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_invert_together_exactly_what_one_process_inverts(tmp_path):
    torch.set_num_threads(1)  # as each rank
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=shared_inversions, args=(r, tmp_path)) for r in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in (0, 1)]
    for size, lower in zip(SIZES, factors(), strict=True):
        expected = lower_triangular_inverse(lower)
        for rank, root in itertools.product((0, 1), (0, 1)):
            assert torch.equal(ranks[rank][f"inverse {size} root {root}"], expected), (rank, root)
    for index, hessian in enumerate(hessians()):
        alone = damp_and_invert(hessian, 0.01)
        assert alone.dampening_frac == (0.01 if index == 0 else 0.1)  # the second: one retry
        for rank in (0, 1):
            upper, frac = ranks[rank][f"upper {index}"]
            assert torch.equal(upper, alone.upper) and frac == alone.dampening_frac
        assert torch.equal(ranks[1][f"alone {index}"], alone.upper)
