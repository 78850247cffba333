"""The tiled reversed Cholesky factorization: against a float64 reference, and shared between
ranks (3 forked gloo processes) with the factor of one process, bit for bit."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from forked_ranks import run_ranks

from lightning_compress.core.distributed import AnotherRankFailedError, all_gather_or_raise
from lightning_compress.modifiers import tiled_cholesky
from lightning_compress.modifiers.hessian import damp_and_factor
from lightning_compress.modifiers.tiled_cholesky import (
    Together,
    factoring_together,
    reverse_cholesky,
)

SIZE = 300  # four tiles of 64 and, first, one of 44


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(tiled_cholesky, "FACTOR_TILE", 64)
    monkeypatch.setattr(tiled_cholesky, "TILED_FROM", 128)


def spd(size: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2 * size, size, generator=generator, dtype=torch.float64)
    return (inputs.T @ inputs / (2 * size) + 0.01 * torch.eye(size, dtype=torch.float64)).to(dtype)


def not_positive_definite() -> torch.Tensor:
    """Positive definite but for one input in the third tile from the end: a negative pivot
    there."""
    matrix = spd(SIZE, 1, torch.float64)
    matrix[150, 150] = -1.0
    return matrix.float()


def reference(matrix: torch.Tensor) -> torch.Tensor:
    """``R`` upper with ``R R^T = matrix``, in float64 by LAPACK on the reversed matrix."""
    return torch.linalg.cholesky(matrix.double().flip(0, 1)).flip(0, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiles_give_the_reversed_cholesky_factor(dtype):
    matrix = spd(SIZE, 0, dtype)
    upper, factored = reverse_cholesky(matrix)
    assert factored and upper.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(upper.double(), reference(matrix), rtol=tolerance, atol=tolerance)
    assert torch.equal(upper, upper.triu())
    assert torch.equal(matrix, spd(SIZE, 0, dtype))  # the input is left as it was


def test_a_matrix_that_is_not_positive_definite_is_reported():
    _, factored = reverse_cholesky(not_positive_definite())
    assert not factored


def test_overwriting_factors_in_the_matrix_and_restores_it_after_a_failure():
    matrix = spd(SIZE, 0)
    upper, factored = reverse_cholesky(matrix, overwrite=True)
    assert factored and upper.data_ptr() == matrix.data_ptr()  # no copy of the matrix
    assert torch.equal(upper, reverse_cholesky(spd(SIZE, 0))[0])
    failing = not_positive_definite()
    _, factored = reverse_cholesky(failing, overwrite=True)
    assert not factored
    assert torch.equal(failing, not_positive_definite())  # as it was, for a retry


def test_a_pivot_without_a_finite_reciprocal_fails_and_the_retry_factors_the_hessian(
    monkeypatch,
):
    """The last diagonal block of the first try gets a zero pivot that LAPACK does not report
    (as a backend might not): the try fails, the matrix is restored, and the retry with 10x
    the dampening factors the Hessian itself."""
    cholesky_ex, calls = torch.linalg.cholesky_ex, []

    def zero_pivot_in_the_fifth_call(matrix):
        lower, info = cholesky_ex(matrix)
        calls.append(matrix.shape[0])
        if len(calls) == 5:  # SIZE has five tiles, factored from the last one
            lower[0, 0] = 0.0
        return lower, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", zero_pivot_in_the_fifth_call)
    matrix = spd(SIZE, 4)
    factor = damp_and_factor(matrix, dampening_frac=1e-3, max_retries=1)
    assert len(calls) == 10 and factor.dampening_frac == pytest.approx(1e-2)
    damped = matrix.double()
    damped.diagonal().add_(1e-2 * matrix.diagonal().double().mean())
    upper = factor.upper.double()
    torch.testing.assert_close(upper @ upper.T, damped, rtol=1e-4, atol=1e-4)


def test_below_the_threshold_one_lapack_call_factors():
    matrix = spd(100, 2)
    upper, factored = reverse_cholesky(matrix)
    expected = torch.linalg.cholesky(matrix.flip(0, 1)).flip(0, 1)
    assert factored and torch.equal(upper, expected)


def test_damp_and_factor_retries_a_tiled_factorization_with_more_dampening():
    matrix = spd(SIZE, 3, torch.float64)
    smallest = torch.linalg.eigvalsh(matrix)[0]
    matrix.diagonal().sub_(smallest + 0.005)  # indefinite until dampened by more than 0.005
    matrix = matrix.float()
    factor = damp_and_factor(matrix, dampening_frac=1e-4, max_retries=3)
    assert factor.dampening_frac == pytest.approx(1e-2)  # 1e-4 and 1e-3 were too little
    damped = matrix.double()
    damped.diagonal().add_(factor.dampening_frac * matrix.diagonal().double().mean())
    upper = factor.upper.double()
    torch.testing.assert_close(upper @ upper.T, damped, rtol=1e-4, atol=1e-4)


def factor_on_three_ranks(directory: Path) -> None:
    """Each rank factors together: a matrix, then one that is not positive definite."""
    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        with factoring_together():
            upper, factored = reverse_cholesky(spd(SIZE, 0))
            _, failed = reverse_cholesky(not_positive_definite())
        torch.save(
            {"upper": upper, "factored": factored, "failed": failed}, directory / f"{rank}.pt"
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_ranks_factoring_together_end_with_one_processs_factor(tmp_path):
    run_ranks(factor_on_three_ranks, tmp_path, ranks=3, timeout=120)
    alone, _ = reverse_cholesky(spd(SIZE, 0))
    for rank in range(3):
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["factored"] and not result["failed"]
        assert torch.equal(result["upper"], alone), rank  # whichever rank updated which tile


def record_what_ranks_raise(directory: Path, work: Callable[[int, Together], None]) -> None:
    """Runs ``work(rank, together)`` inside :func:`factoring_together` as the solves do (giving
    up on an error, then gathering the ranks' errors); each rank writes what it raised."""
    rank = int(os.environ["LOCAL_RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    raised = []
    try:
        error = None
        with factoring_together() as together:
            try:
                work(rank, together)
            except Exception as err:
                together.give_up()
                error = err
                raised.append(type(err).__name__)
        try:
            all_gather_or_raise(None, error)
        except Exception as err:
            raised.append(f"{type(err).__name__}: {err}")
        (directory / f"{rank}.json").write_text(json.dumps(raised))
    finally:
        dist.destroy_process_group()


def assert_rank_one_failed_everywhere(directory: Path) -> None:
    """Rank 1 raised its error, the others AnotherRankFailedError; then every rank raised
    rank 1's error."""
    for rank in range(3):
        first = "MemoryError" if rank == 1 else "AnotherRankFailedError"
        raised = json.loads((directory / f"{rank}.json").read_text())
        assert raised == [first, "MemoryError: rank 1 ran out of memory"], rank


def give_up_before_the_second_factorization(rank: int, together: Together) -> None:
    reverse_cholesky(spd(SIZE, 0))
    if rank == 1:
        raise MemoryError("rank 1 ran out of memory")
    reverse_cholesky(spd(SIZE, 1))


@pytest.mark.distributed
def test_a_rank_giving_up_stops_the_others_at_the_next_factorization(tmp_path):
    run_ranks(record_what_ranks_raise, tmp_path, give_up_before_the_second_factorization, ranks=3)
    assert_rank_one_failed_everywhere(tmp_path)


def test_alone_agreeing_and_giving_up_need_no_other_rank():
    with factoring_together() as together:
        together.agree()
        together.give_up()
        with pytest.raises(AnotherRankFailedError):  # stopped: nothing is factored together
            reverse_cholesky(spd(SIZE, 0))


FAILURES = {  # rank 1 owns tiles 1 and 4 of the five
    "an update of its later tile": ("_update", (4, 0)),
    "its first panel": ("_factor_own_panel", (1,)),
    "taking the last panel, after its own": ("_take_panel", (4,)),
}


def fail_inside_on_rank_one(directory: Path, method: str, failing: tuple[int, ...]) -> None:
    """Rank 1's ``method`` raises when called for ``failing`` inside a factorization."""
    original = getattr(tiled_cholesky._Tiles, method)

    def step(tiles, *args):
        if int(os.environ["LOCAL_RANK"]) == 1 and args[: len(failing)] == failing:
            raise MemoryError("rank 1 ran out of memory")
        return original(tiles, *args)

    def factor(rank: int, together: Together) -> None:
        reverse_cholesky(spd(SIZE, 0))
        together.agree()

    setattr(tiled_cholesky._Tiles, method, step)
    record_what_ranks_raise(directory, factor)


@pytest.mark.distributed
@pytest.mark.parametrize("where", list(FAILURES))
def test_a_rank_failing_inside_a_factorization_stops_every_rank(tmp_path, where):
    method, failing = FAILURES[where]
    run_ranks(fail_inside_on_rank_one, tmp_path, method, failing, ranks=3, timeout=120)
    assert_rank_one_failed_everywhere(tmp_path)


def test_alone_an_error_inside_a_factorization_is_raised_at_once(monkeypatch):
    def fail(tiles, *args):
        raise MemoryError("out of memory")

    monkeypatch.setattr(tiled_cholesky._Tiles, "_update", fail)
    with pytest.raises(MemoryError, match="out of memory"):
        reverse_cholesky(spd(SIZE, 0))
