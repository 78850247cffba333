"""Checks and fits the constants of the DDP owner choice's solve-time estimate on this machine.

``lightning_compress/modifiers/layerwise_split.py`` estimates one GPTQ / SparseGPT call on a
``[rows, cols]`` weight as ``COLUMN_SECONDS * cols + HESSIAN_SECONDS * cols**2 +
FACTORIZATION_SECONDS * cols**3`` (paid once per call: the sweep's per-column steps, the Hessian
made ready and factored) plus ``rows * (PRODUCT_SECONDS * cols**2 +
ELEMENT_SECONDS * cols)`` (the column sweep). This times GPTQ W4 g128 calls (static activation
order, the default) as the modifier makes them, from the reduced float64 Hessian to the
quantized weight, on one thread, for shapes from 128 x 512 to 1024 x 4096 (the best of
``--repeats``), fits the five constants (least squares on the relative error) and prints them,
then each shape's measured time, the fit's estimate and the estimate of the constants in use
(:func:`~lightning_compress.modifiers.layerwise_split.solve_cost`). On a machine shared with
other jobs the times move by 10-30% between runs: fit on a quiet machine.

    taskset -c 1 python benchmarks/solve_costs.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_compress.modifiers.hessian import HessianAccumulator
from lightning_compress.modifiers.layerwise_split import solve_cost
from lightning_compress.modifiers.quantization.args import QuantizationArgs
from lightning_compress.modifiers.quantization.gptq import gptq_quantize

SHAPES = {  # cols: rows
    512: [128, 512, 2048],
    1024: [128, 512, 1024, 2816, 5632],
    1536: [128, 576, 1536],
    2048: [128, 1024, 2048],
    2816: [128, 512, 1024],
    4096: [128, 1024],
}
NAMES = (
    "COLUMN_SECONDS",
    "HESSIAN_SECONDS",
    "FACTORIZATION_SECONDS",
    "PRODUCT_SECONDS",
    "ELEMENT_SECONDS",
)


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
    args = parser.parse_args()
    torch.set_num_threads(1)
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
