"""Which rank solves which layer, and the helpers' behaviour in one process (the DDP test,
tests/lightning/test_weight_parallel_ddp.py, runs them on 2 ranks)."""

from __future__ import annotations

import itertools
import pickle
from itertools import product

import pytest
import torch

from lightning_compress.core.distributed import (
    all_gather_or_raise,
    balanced_owners,
    broadcast_tensors_,
)
from lightning_compress.modifiers import GPTQModifier
from lightning_compress.modifiers.layerwise_modifier import PendingLayer
from lightning_compress.modifiers.layerwise_split import (
    FACTORIZATION_SECONDS,
    ROW_ALIGN,
    CompressedLayer,
    OwnedStack,
    StackOutcome,
    assign_owners,
    call_cost,
    join_row_slices,
    plan_load,
    row_bounds,
    row_cost,
    share_outcomes,
    solve_cost,
)
from lightning_compress.modifiers.pruning import SparseGPTModifier
from lightning_compress.modifiers.quantization.args import QuantizationArgs, QuantizationScheme
from lightning_compress.modifiers.tiled_cholesky import TILED_FROM


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
    with pytest.raises(ValueError, match="keys: expected one key or None per task"):
        balanced_owners([1.0, 2.0], 2, [None])
    with pytest.raises(ValueError, match="keys: expected one key or None per task"):
        balanced_owners([1.0, 2.0], 2, [None, "h"], {})
    with pytest.raises(ValueError, match="costs: expected values >= 0"):
        balanced_owners([1.0], 2, ["h"], {"h": -1.0})


def test_balanced_owners_count_shared_work_once_per_rank():
    # the two tasks sharing "h" (4) end on one rank: 2 + 2 + 4 = 8 against 5, where apart
    # they would cost 6 each, one of them beside the 5
    assert balanced_owners([2.0, 5.0, 2.0], 2, ["h", None, "h"], {"h": 4.0}) == [1, 0, 1]
    # the greedy pass spreads them (loads 6 and 3), a move joins them: 1 + 1 + 2 = 4 and 3
    assert balanced_owners([1.0, 1.0, 3.0], 2, ["h", "h", None], {"h": 2.0}) == [1, 1, 0]
    assert balanced_owners([1.0, 1.0], 2, ["h", "h"], {"h": 0.5}) == [0, 1]


def best_plan_load(stacks, shapes, world_size):
    """The lowest busiest-rank time over every assignment of whole layers to ranks, the
    layers of one stack on one rank solved in one call (brute force)."""
    names = [name for stack in stacks for name in stack]
    best = float("inf")
    for owners in product(range(world_size), repeat=len(names)):
        owner = dict(zip(names, owners, strict=True))
        loads = [0.0] * world_size
        for stack in stacks:
            for rank in range(world_size):
                rows = sum(shapes[name][0] for name in stack if owner[name] == rank)
                if rows:
                    loads[rank] += solve_cost(rows, shapes[stack[0]][1])
        best = min(best, max(loads))
    return best


def test_a_plans_load_is_its_busiest_ranks_calls():
    shapes = {"a": (128, 256), "b": (64, 256), "c": (256, 512)}
    plan = [
        OwnedStack(["a", "b"], 0),
        OwnedStack(["c"], 1, (0, 64)),
        OwnedStack(["c"], 1, (64, 256)),
    ]
    expected = max(solve_cost(192, 256), solve_cost(64, 512) + solve_cost(192, 512))
    assert plan_load(plan, shapes, 2) == expected
    assert plan_load(plan, shapes, 3) == expected  # an idle rank adds nothing


def test_solve_cost_is_a_calls_fixed_part_plus_its_rows():
    for rows, cols in ((1, 64), (1024, 2816), (4096, 11008)):
        assert solve_cost(rows, cols) == call_cost(cols) + rows * row_cost(cols)
    # measured on one CPU thread (benchmarks/solve_costs.py): down_proj of the benchmark
    # decoder costs 0.39 s a call, 0.25 s with 128 rows; q_proj 0.076 s; 2048 x 8192 6.3 s
    assert solve_cost(1024, 2816) == pytest.approx(0.39, rel=0.2)
    assert solve_cost(128, 2816) == pytest.approx(0.25, rel=0.2)
    assert solve_cost(1024, 1024) == pytest.approx(0.076, rel=0.2)
    assert solve_cost(2048, 8192) == pytest.approx(6.3, rel=0.2)


BLOCK = {  # the benchmark decoder's block: hidden 1024, 4 key/value heads of 64, MLP 2816
    "q": (1024, 1024),
    "k": (256, 1024),
    "v": (256, 1024),
    "o": (1024, 1024),
    "gate": (2816, 1024),
    "up": (2816, 1024),
    "down": (1024, 2816),
}
BLOCK_STACKS = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]


def test_a_whole_block_keeps_stacks_whole_where_splitting_would_repeat_the_inversion():
    plan = assign_owners(BLOCK_STACKS, BLOCK, bool, 2, bool)
    # down_proj alone is most of the block: every other stack, whole, on the other rank
    assert plan == [
        OwnedStack(["q", "k", "v"], 1),
        OwnedStack(["o"], 1),
        OwnedStack(["gate", "up"], 1),
        OwnedStack(["down"], 0),
    ]
    assert plan_load(plan, BLOCK, 2) == best_plan_load(BLOCK_STACKS, BLOCK, 2)


@pytest.mark.parametrize(
    ("stack", "expected"),
    [
        (["q", "k", "v"], [OwnedStack(["q"], 0), OwnedStack(["k", "v"], 1)]),
        (["gate", "up"], [OwnedStack(["gate"], 0), OwnedStack(["up"], 1)]),
        (["o"], [OwnedStack(["o"], 0, (0, 512)), OwnedStack(["o"], 1, (512, 1024))]),
        (["down"], [OwnedStack(["down"], 0, (0, 512)), OwnedStack(["down"], 1, (512, 1024))]),
    ],
)
def test_a_group_alone_is_split_where_the_estimate_says_it_pays(stack, expected):
    plan = assign_owners([stack], BLOCK, bool, 2, bool)
    assert plan == expected
    whole = solve_cost(sum(BLOCK[name][0] for name in stack), BLOCK[stack[0]][1])
    assert plan_load(plan, BLOCK, 2) < whole
    if all(part.rows is None for part in plan):
        assert plan_load(plan, BLOCK, 2) == best_plan_load([stack], BLOCK, 2)


def test_small_layers_are_assigned_as_the_best_split_of_their_calls():
    shapes = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "g": (128, 64)}
    stacks = [["q", "k", "v"], ["o"], ["g"]]
    plan = assign_owners(stacks, shapes, bool, 2)
    assert plan == [
        OwnedStack(["k"], 0),
        OwnedStack(["q", "v"], 1),  # one call, in the stack's order
        OwnedStack(["o"], 1),
        OwnedStack(["g"], 0),
    ]
    assert plan_load(plan, shapes, 2) == best_plan_load(stacks, shapes, 2)
    whole = assign_owners(stacks, shapes, lambda stack: False, 2)
    assert [part.names for part in whole] == stacks
    assert assign_owners(stacks, shapes, bool, 1) == [OwnedStack(stack, 0) for stack in stacks]


@pytest.mark.parametrize("world_size", [2, 3])
def test_owners_stay_within_the_greedy_bound_of_the_best_split_of_calls(world_size):
    generator = torch.Generator().manual_seed(world_size)

    def draw(high: int) -> int:
        return int(torch.randint(1, high + 1, (1,), generator=generator))

    for _ in range(30):
        shapes, stacks = {}, []
        for index in range(draw(3)):
            cols = 256 * 2 ** draw(3)
            stack = [f"{index}.{layer}" for layer in range(draw(3))]
            shapes.update({name: (64 * draw(64), cols) for name in stack})
            stacks.append(stack)
        plan = assign_owners(stacks, shapes, bool, world_size)
        best = best_plan_load(stacks, shapes, world_size)
        assert plan_load(plan, shapes, world_size) <= 4 / 3 * best


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


def test_only_a_dominant_row_divisible_layer_is_split_each_slice_on_its_own_rank():
    shapes = {"q": (128, 128), "o": (128, 128), "down": (4096, 256), "tiny": (256, 64)}
    stacks = [["q"], ["o"], ["down"], ["tiny"]]
    plan = assign_owners(stacks, shapes, lambda stack: True, 2, lambda name: name != "tiny")
    down = [part for part in plan if part.names == ["down"]]
    assert [(part.rows, part.owner) for part in down] == [((0, 2048), 0), ((2048, 4096), 1)]
    assert all(part.rows is None for part in plan if part.names != ["down"])
    # one rank, or no layer allowed: nothing is cut
    assert all(part.rows is None for part in assign_owners(stacks, shapes, bool, 1, bool))
    assert all(part.rows is None for part in assign_owners(stacks, shapes, bool, 2))
    # a layer that already balances the others stays whole: slices would only add calls
    even = {"a": (1024, 1024), "b": (256, 1024), "c": (256, 1024), "d": (512, 1024)}
    balanced = assign_owners([["a"], ["b", "c", "d"]], even, bool, 2, bool)
    assert all(part.rows is None for part in balanced)


def test_a_sliced_layer_has_a_slice_on_every_rank_which_factor_its_hessian_together():
    shapes = {"down": (4096, 8192), "q": (512, 512), "o": (512, 512)}
    stacks = [["q"], ["down"], ["o"]]
    plan = assign_owners(stacks, shapes, bool, 3, bool)
    down = [(part.rows, part.owner) for part in plan if part.names == ["down"]]
    assert [owner for _, owner in down] == [0, 1, 2]
    assert [rows for rows, _ in down] == [(0, 1344), (1344, 2752), (2752, 4096)]
    # each slice pays a third of the factorization (tiles: from TILED_FROM inputs on)
    factorization = FACTORIZATION_SECONDS * 8192.0**3
    assert call_cost(8192, 3) == pytest.approx(call_cost(8192) - factorization * 2 / 3)
    assert call_cost(TILED_FROM - 1, 3) == call_cost(TILED_FROM - 1)
    slices = [part for part in plan if part.rows is not None]
    rest = [part for part in plan if part.rows is None]
    loads = [0.0] * 3
    for part in slices:
        loads[part.owner] += solve_cost(part.rows[1] - part.rows[0], 8192, 3)
    for part in rest:
        loads[part.owner] += solve_cost(512, 512)
    assert plan_load(plan, shapes, 3) == pytest.approx(max(loads))


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
