"""Checks and fits the constants of the DDP owner choice's solve-time estimate on this machine.

``lightning_compress/modifiers/layerwise_split.py`` estimates one GPTQ / SparseGPT call on a
``[rows, cols]`` weight as ``COLUMN_SECONDS * cols + HESSIAN_SECONDS * cols**2 +
FACTORIZATION_SECONDS * cols**3`` (paid once per call: the sweep's per-column steps, the Hessian
made ready and factored) plus ``rows * (PRODUCT_SECONDS * cols**2 +
ELEMENT_SECONDS * cols)`` (the column sweep). This times GPTQ W4 g128 calls (static activation
order, the default) as the modifier makes them, from the reduced float64 Hessian to the
quantized weight, on one thread, for shapes from 128 x 512 to 2048 x 8192 (the best of
``--repeats``), fits the five constants (least squares on the relative error) and prints them,
then each shape's measured time, the fit's estimate and the estimate of the constants in use
(:func:`~lightning_compress.modifiers.layerwise_split.solve_cost`). On a machine shared with
other jobs the times move by 10-30% between runs: fit on a quiet machine.

    taskset -c 1 python benchmarks/solve_costs.py [--repeats 2]

``--methods`` times one call of each method on one weight (``--shape ROWS COLS``, default the
benchmark decoder's ``down_proj``, 1024 x 2816): GPTQ W4 in groups of ``--group-size`` (128) in
static and natural activation order, SparseGPT 2:4 and 50% unstructured, the best CPU time of
``--repeats``.

    taskset -c 1 python benchmarks/solve_costs.py --methods --repeats 3

``--factor`` times the reversed Cholesky factor ``R`` (``R R^T = H``) of one ``[n, n]`` Hessian
per size: one LAPACK call on the reversed copy, reversed back, and the tiles of
``modifiers/tiled_cholesky.py`` in the matrix's own memory (as the solves factor: a copy made
before the clock starts), on one thread; then the tiles factored together by 2
processes (gloo, one thread each: the slowest rank's wall time), the best of ``--repeats``;
the factors of one and two processes are checked equal, bit for bit.

    python benchmarks/solve_costs.py --factor --repeats 3

``--estimate`` measures nothing: it prints, for the dense blocks of real models, the busiest of 2
ranks' estimated solve time over one process's with the owners the constants in use choose
(:func:`~lightning_compress.modifiers.layerwise_split.assign_owners`, GPTQ's rules: stacks
divisible, every layer row-divisible), for the whole block and for the staged groups (each
group solved before the next one's calibration).

    python benchmarks/solve_costs.py --estimate
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.layerwise_split import assign_owners, solve_cost
from lightning_compress.modifiers.pruning.sparsegpt import sparsegpt_prune
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.gptq import gptq_quantize
from lightning_compress.modifiers.tiled_cholesky import (
    factoring_together,
    reverse_cholesky,
    reverse_cholesky_in_one_call,
)

SHAPES = {  # cols: rows
    512: [128, 512, 2048],
    1024: [128, 512, 1024, 2816, 5632],
    1536: [128, 576, 1536],
    2048: [128, 1024, 2048, 8192, 16384],
    2816: [128, 512, 1024],
    4096: [128, 1024],
    8192: [128, 1024, 2048],
}
NAMES = (
    "COLUMN_SECONDS",
    "HESSIAN_SECONDS",
    "FACTORIZATION_SECONDS",
    "PRODUCT_SECONDS",
    "ELEMENT_SECONDS",
)


def time_methods(rows: int, cols: int, group_size: int, repeats: int) -> None:
    """Prints the best CPU time of one call of each method on a ``[rows, cols]`` weight."""
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=group_size)
    generator = torch.Generator().manual_seed(0)
    statistics = HessianAccumulator(cols)
    statistics.add(torch.randn(2 * cols, cols, generator=generator))
    weight = torch.randn(rows, cols, generator=generator)
    methods = {
        f"GPTQ W4 g{group_size}, static order": lambda h: gptq_quantize(
            weight, h, args, 128, 0.01, "weight"
        ),
        f"GPTQ W4 g{group_size}, natural order": lambda h: gptq_quantize(
            weight, h, args, 128, 0.01, None
        ),
        "SparseGPT 2:4": lambda h: sparsegpt_prune(weight, h, 0.5, (2, 4)),
        "SparseGPT 50%": lambda h: sparsegpt_prune(weight, h, 0.5),
    }
    for name, method in methods.items():
        best = float("inf")
        for _ in range(repeats):
            begin = time.process_time()
            method(statistics.hessian().to(torch.float32))
            best = min(best, time.process_time() - begin)
        print(f"{name}, {rows} x {cols}: {best:.3f} s", flush=True)


FACTOR_SIZES = (2048, 2816, 4096, 8192)


def time_factorizations(repeats: int) -> None:
    """Prints, per size, the best time of one LAPACK call, the tiles alone and the tiles
    factored together by 2 processes."""
    print(
        "| inputs | LAPACK, 1 process (s) | tiles, 1 process (s) | tiles, 2 processes (s) | ratio |"
    )
    print("|---:|---:|---:|---:|---:|")
    for size in FACTOR_SIZES:
        hessian = spd_hessian(size)
        lapack = best_of(repeats, partial(reverse_cholesky_in_one_call, hessian))
        alone = best_of(repeats, partial(reverse_cholesky, overwrite=True), hessian)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory)
            port = 29400 + size % 1000
            mp.spawn(factor_on_rank, args=(size, repeats, port, path), nprocs=2)
            together = max(torch.load(path / f"{rank}.pt")["seconds"] for rank in (0, 1))
            assert torch.equal(torch.load(path / "0.pt")["upper"], reverse_cholesky(hessian)[0])
        print(
            f"| {size} | {lapack:.3f} | {alone:.3f} | {together:.3f} | {together / alone:.2f} |",
            flush=True,
        )


def spd_hessian(size: int) -> torch.Tensor:
    """A damped Hessian of ``2 * size`` random inputs, float32."""
    inputs = torch.randn(2 * size, size, generator=torch.Generator().manual_seed(size))
    hessian = inputs.T @ inputs / (2 * size)
    return hessian + 0.01 * hessian.diagonal().mean() * torch.eye(size)


def best_of(repeats: int, call: Callable[..., object], *copied: torch.Tensor) -> float:
    """The best wall time of ``repeats`` calls, each given fresh copies of ``copied`` (made
    before its clock starts)."""
    best = float("inf")
    for _ in range(repeats):
        arguments = [tensor.clone() for tensor in copied]
        begin = time.perf_counter()
        call(*arguments)
        best = min(best, time.perf_counter() - begin)
    return best


def factor_on_rank(rank: int, size: int, repeats: int, port: int, directory: Path) -> None:
    """One of 2 ranks factoring together; saves its best time and its factor."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    hessian = spd_hessian(size)

    def together(matrix: torch.Tensor) -> None:
        dist.barrier()
        with factoring_together():
            factors.append(reverse_cholesky(matrix, overwrite=True)[0])

    factors: list[torch.Tensor] = []
    seconds = best_of(repeats, together, hessian)
    torch.save({"seconds": seconds, "upper": factors[-1]}, directory / f"{rank}.pt")
    dist.destroy_process_group()


def measure(repeats: int) -> list[tuple[int, int, float]]:
    """``(rows, cols, seconds)`` of one call per shape: the best CPU time of ``repeats``."""
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=128)
    generator = torch.Generator().manual_seed(0)
    calls = []
    for cols, heights in SHAPES.items():
        statistics = HessianAccumulator(cols)
        statistics.add(torch.randn(2 * cols, cols, generator=generator))
        for rows in heights:
            weight = torch.randn(rows, cols, generator=generator)
            best = float("inf")
            for _ in range(repeats):
                begin = time.process_time()
                hessian = statistics.hessian().to(torch.float32)
                gptq_quantize(weight, hessian, args, 128, 0.01, "weight")
                best = min(best, time.process_time() - begin)
            calls.append((rows, cols, best))
            print(f"{rows} x {cols}: {best:.4f} s", flush=True)
    return calls


MODELS = {  # name: (hidden, intermediate, query heads, key/value heads, head size)
    "benchmark decoder": (1024, 2816, 16, 4, 64),
    "Llama-3.2-1B": (2048, 8192, 32, 8, 64),
    "Llama-3-8B": (4096, 14336, 32, 8, 128),
    "Llama-3-70B": (8192, 28672, 64, 8, 128),
}


def print_estimates(world_size: int = 2) -> None:
    """Prints each model's estimated solve time on ``world_size`` ranks over one process's."""
    for name, (hidden, intermediate, heads, kv_heads, head) in MODELS.items():
        shapes = {
            "q": (heads * head, hidden),
            "k": (kv_heads * head, hidden),
            "v": (kv_heads * head, hidden),
            "o": (hidden, heads * head),
            "gate": (intermediate, hidden),
            "up": (intermediate, hidden),
            "down": (hidden, intermediate),
        }
        groups = [[["q", "k", "v"]], [["o"]], [["gate", "up"]], [["down"]]]
        whole = [stack for group in groups for stack in group]
        one = sum(load(stacks, shapes, 1) for stacks in groups)
        staged = sum(load(stacks, shapes, world_size) for stacks in groups)
        print(
            f"{name}: whole block {load(whole, shapes, world_size) / one:.2f}, "
            f"staged {staged / one:.2f} ({world_size} ranks over 1, estimated)"
        )


def load(stacks: list[list[str]], shapes: dict, world_size: int) -> float:
    """The busiest rank's estimated solve time under the owners ``assign_owners`` picks."""
    # imported here, so that --methods also runs on the library of commits before plan_load
    from lightning_compress.modifiers.layerwise_split import plan_load

    return plan_load(assign_owners(stacks, shapes, bool, world_size, bool), shapes, world_size)


def terms(rows: int, cols: int) -> list[float]:
    """The operation counts the constants multiply, in the order of ``NAMES``."""
    return [
        float(cols),
        float(cols) ** 2,
        float(cols) ** 3,
        float(rows) * cols**2,
        float(rows) * cols,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--estimate", action="store_true", help="print estimates, time nothing")
    parser.add_argument("--methods", action="store_true", help="time one call of each method")
    parser.add_argument("--factor", action="store_true", help="time the factorizations")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument(
        "--shape", type=int, nargs=2, default=(1024, 2816), metavar=("ROWS", "COLS")
    )
    args = parser.parse_args()
    if args.estimate:
        print_estimates()
        return
    torch.set_num_threads(1)
    if args.methods:
        time_methods(*args.shape, args.group_size, args.repeats)
        return
    if args.factor:
        time_factorizations(args.repeats)
        return
    calls = measure(args.repeats)
    seconds = torch.tensor([t for _, _, t in calls], dtype=torch.float64)
    counts = torch.tensor([terms(r, c) for r, c, _ in calls], dtype=torch.float64)
    weighted = counts / seconds[:, None]  # the least relative error
    fitted = torch.linalg.lstsq(weighted, torch.ones_like(seconds)[:, None]).solution.squeeze(1)
    for name, value in zip(NAMES, fitted.tolist(), strict=True):
        print(f"{name} = {value:.2g}")
    for (rows, cols, measured), estimate in zip(calls, (counts @ fitted).tolist(), strict=True):
        print(
            f"{rows} x {cols}: {measured:.4f} s measured, {estimate:.4f} s fitted, "
            f"{solve_cost(rows, cols):.4f} s in use"
        )


if __name__ == "__main__":
    main()
