"""Peak memory and wall time of compressing a checkpoint directory, versus its depth.

Each measurement runs in a child process (so its peak resident memory, read from the
kernel's accounting of that child by ``os.wait4``, holds nothing but the run) over a synthetic
bf16 Llama (``benchmarks/synthetic_checkpoint.py``):

* ``model_free``: ``model_free_compress`` with W4A16 (int4, groups of 128, round to nearest),
  one worker;
* ``gptq``: ``oneshot(model=DIR, out_of_core=True)`` with GPTQ W4A16 (groups of 128) on a small
  calibration set (``--samples`` windows of ``--seq_len`` tokens of the bundled text).

``depth`` writes one checkpoint per depth at a fixed width, measures each method on each and
prints a table: the goal is a flat memory curve (the growth from the shallowest to the deepest
model at most 15% of the added blocks' bf16 size). ``run`` measures one method on an existing
checkpoint (e.g. one larger than this machine's memory)::

    python benchmarks/larger_than_memory.py depth --work /work/bigmodel/depth
    python benchmarks/larger_than_memory.py run --model /work/bigmodel/big --method model_free \\
        --output /work/bigmodel/big-w4

Run it on an otherwise idle machine (``nice -n 10 taskset -c 1`` keeps it off the others' way
but makes times noisier).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from synthetic_checkpoint import llama_config, tensor_shapes, write_checkpoint

METHODS = ("model_free", "gptq")
GROUP = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


def recipe(method: str) -> dict:
    """The W4A16 recipe of ``method`` (the LM head is left in bf16).

    Args:
        method: ``model_free`` or ``gptq``.

    Returns:
        The recipe as a mapping.
    """
    modifier = "QuantizationModifier" if method == "model_free" else "GPTQModifier"
    group = {"targets": ["Linear"], "weights": GROUP}
    settings = {"ignore": ["lm_head"], "config_groups": {"group_0": group}}
    return {"quant_stage": {"quant_modifiers": {modifier: settings}}}


def compress(method: str, model: Path, output: Path, samples: int, seq_len: int) -> None:
    """Compresses ``model`` into ``output`` with ``method`` (in this process).

    Args:
        method: ``model_free`` or ``gptq``.
        model: the checkpoint directory.
        output: the compressed checkpoint's directory (replaced).
        samples: calibration windows (``gptq``).
        seq_len: tokens per window (``gptq``).
    """
    if method == "model_free":
        from lightning_compress import model_free_compress

        model_free_compress(model, recipe(method), output, overwrite=True, progress=False)
        return
    from lightning_compress import oneshot
    from lightning_compress.bundled import bundled_text

    oneshot(
        model=str(model),
        recipe=recipe(method),
        dataset=bundled_text("calibration"),
        num_calibration_samples=samples,
        max_seq_length=seq_len,
        output_dir=output,
        overwrite_output_dir=True,
        out_of_core=True,
        progress=False,
    )


def measure(method: str, model: Path, output: Path, samples: int, seq_len: int) -> dict:
    """Runs :func:`compress` in a child process.

    Args:
        method: ``model_free`` or ``gptq``.
        model: the checkpoint directory.
        output: the compressed checkpoint's directory.
        samples: calibration windows (``gptq``).
        seq_len: tokens per window (``gptq``).

    Returns:
        ``{"peak_rss_gb", "seconds", "output_gb"}`` (GB: 1e9 bytes).

    Raises:
        RuntimeError: when the child fails.
    """
    argv = [sys.executable, __file__, "_child", method, str(model), str(output)]
    argv += [str(samples), str(seq_len)]
    begin = time.perf_counter()
    child = subprocess.Popen(argv)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - begin
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{method} on {model} failed (exit status {status})")
    size = sum(path.stat().st_size for path in output.glob("*.safetensors"))
    peak = usage.ru_maxrss * 1024 / 1e9  # Linux counts ru_maxrss in KiB
    return {"peak_rss_gb": peak, "seconds": seconds, "output_gb": size / 1e9}


def block_gb(hidden: int, intermediate: int, kv_heads: int | None) -> float:
    """The bf16 size of one decoder block, in GB (1e9 bytes)."""
    shapes = tensor_shapes(llama_config(hidden, intermediate, 1, kv_heads))
    return sum(2 * math.prod(s) for n, s in shapes.items() if ".layers.0." in n) / 1e9


def depth_table(args: argparse.Namespace) -> list[dict]:
    """Measures every method at every depth; prints the table and returns its rows."""
    rows = []
    for depth in args.depths:
        model = args.work / f"llama-{args.hidden}x{depth}"
        if not model.exists():
            write_checkpoint(model, args.hidden, args.intermediate, depth, args.kv_heads)
        for method in args.methods:
            output = args.work / f"out-{method}-{depth}"
            row = measure(method, model, output, args.samples, args.seq_len)
            rows.append({"method": method, "blocks": depth, **row})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(output)
        if not args.keep:
            shutil.rmtree(model)
    _print_table(rows, block_gb(args.hidden, args.intermediate, args.kv_heads))
    return rows


def _print_table(rows: list[dict], block: float) -> None:
    print("\n| method | blocks | bf16 weights (GB) | peak RSS (GB) | time (s) |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['method']} | {row['blocks']} | {row['blocks'] * block:.2f} | "
            f"{row['peak_rss_gb']:.2f} | {row['seconds']:.0f} |"
        )
    for method in dict.fromkeys(row["method"] for row in rows):
        mine = [row for row in rows if row["method"] == method]
        first, last = mine[0], mine[-1]
        added = (last["blocks"] - first["blocks"]) * block
        growth = last["peak_rss_gb"] - first["peak_rss_gb"]
        if added > 0:
            print(
                f"{method}: peak RSS grew {growth:.3f} GB over {added:.2f} GB of added blocks "
                f"({100 * growth / added:.1f}%; goal at most 15%)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    depth = commands.add_parser("depth", help="the table of peak memory and time versus depth")
    depth.add_argument("--work", type=Path, required=True, help="where checkpoints are written")
    depth.add_argument("--hidden", type=int, default=1024)
    depth.add_argument("--intermediate", type=int, default=2816)
    depth.add_argument("--kv_heads", type=int, default=None)
    depth.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    depth.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    depth.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    run = commands.add_parser("run", help="one method on an existing checkpoint")
    run.add_argument("--model", type=Path, required=True)
    run.add_argument("--method", choices=METHODS, required=True)
    run.add_argument("--output", type=Path, required=True)
    for sub in (depth, run):
        sub.add_argument("--samples", type=int, default=4, help="gptq: calibration windows")
        sub.add_argument("--seq_len", type=int, default=128, help="gptq: tokens per window")
    child = commands.add_parser("_child")
    child.add_argument("method")
    child.add_argument("model", type=Path)
    child.add_argument("output", type=Path)
    child.add_argument("samples", type=int)
    child.add_argument("seq_len", type=int)
    args = parser.parse_args()
    if args.command == "_child":
        compress(args.method, args.model, args.output, args.samples, args.seq_len)
    elif args.command == "depth":
        depth_table(args)
    else:
        row = measure(args.method, args.model, args.output, args.samples, args.seq_len)
        weights = sum(p.stat().st_size for p in args.model.glob("*.safetensors")) / 1e9
        print(json.dumps({"method": args.method, "model_gb": weights, **row}))


if __name__ == "__main__":
    main()
