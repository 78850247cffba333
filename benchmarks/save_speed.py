"""Saving speed beside compression speed, on a model of SmolLM2-135M's shape.

Builds a ``LlamaForCausalLM`` with SmolLM2-135M's configuration (hidden 576, 30 layers, MLP 1536,
9 heads / 3 KV heads, vocab 49152, tied embeddings) and random bf16 weights, quantizes every
``Linear`` but ``lm_head`` round-to-nearest to symmetric int4 in groups of 64 (data-free
``oneshot``), then times ``save_compressed`` (every layer packed and checked to read back as
it is in memory: its packed codes unpacked by compressed-tensors and dequantized exactly to the
weight, the first layer of each shape also through compressed-tensors' decompressor; written
and fsynced). Each repeat builds a fresh model.

    python benchmarks/save_speed.py [--repeats 5] [--threads 1] [--profile]

Prints a Markdown table of compression and save seconds per repeat, wall-clock and CPU time of
this process (steadier than wall-clock on a busy machine), then the median and range of each
column; ``--profile`` also prints the top of a cProfile of the last save.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from loguru import logger
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress import oneshot
from lightning_compress.export import save_compressed
from lightning_compress.modifiers import QuantizationModifier

SMOLLM2_135M = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
W4A16_G64 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {
            "num_bits": 4,
            "type": "int",
            "symmetric": True,
            "strategy": "group",
            "group_size": 64,
        },
    }
}


def build_model(seed: int) -> LlamaForCausalLM:
    """A SmolLM2-135M-shaped Llama with random bf16 weights."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).to(torch.bfloat16).eval()


def measure(seed: int, profiler: cProfile.Profile | None) -> dict[str, float]:
    """Compresses and saves one fresh model; returns the seconds of each phase."""
    model = build_model(seed)
    begin, begin_cpu = time.perf_counter(), time.process_time()
    oneshot(model, [QuantizationModifier(config_groups=W4A16_G64, ignore=["lm_head"])])
    compress_s, compress_cpu_s = time.perf_counter() - begin, time.process_time() - begin_cpu
    with tempfile.TemporaryDirectory() as directory:
        if profiler is not None:
            profiler.enable()
        begin, begin_cpu = time.perf_counter(), time.process_time()
        save_compressed(model, Path(directory) / "checkpoint")
        save_s, save_cpu_s = time.perf_counter() - begin, time.process_time() - begin_cpu
        if profiler is not None:
            profiler.disable()
    return {
        "compress_s": compress_s,
        "save_s": save_s,
        "compress_cpu_s": compress_cpu_s,
        "save_cpu_s": save_cpu_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady on a shared machine, where waiting threads swing timings)",
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the last save")
    parser.add_argument("--sort", default="cumulative", help="profile order (pstats keys)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    rows = []
    for repeat in range(args.repeats):
        last = repeat == args.repeats - 1
        profiler = cProfile.Profile() if args.profile and last else None
        rows.append(measure(repeat, profiler))
    setup = f"{args.threads} threads, torch {torch.__version__}"
    print(f"SmolLM2-135M shape, bf16, RTN W4A16 g64, {setup}")
    print(
        "| repeat | compress (s) | save (s) | save / compress | compress CPU (s) | save CPU (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for index, row in enumerate(rows, 1):
        ratio = row["save_s"] / row["compress_s"]
        print(
            f"| {index} | {row['compress_s']:.2f} | {row['save_s']:.2f} | {ratio:.2f} "
            f"| {row['compress_cpu_s']:.2f} | {row['save_cpu_s']:.2f} |"
        )
    columns = ("compress_s", "save_s", "compress_cpu_s", "save_cpu_s")
    ratios = [row["save_s"] / row["compress_s"] for row in rows]
    cells = [_median_range([row[column] for row in rows]) for column in columns]
    print(
        f"| median (min-max) | {cells[0]} | {cells[1]} | {_median_range(ratios)} "
        f"| {cells[2]} | {cells[3]} |"
    )
    if args.profile:
        pstats.Stats(profiler).sort_stats(args.sort).print_stats(40)


def _median_range(values: list[float]) -> str:
    """``median (min-max)`` of ``values``, to two decimals."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    main()
