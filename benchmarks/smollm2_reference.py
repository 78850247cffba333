"""One run of the SmolLM2-135M one-shot benchmark with llm-compressor (the reference project).

Runs in llm-compressor's own environment (it imports only torch, transformers, datasets and
llmcompressor), on the model and windows that ``smollm2.py prepare`` saved, and prints one
``RESULT {json}`` line: compression wall time (the ``oneshot`` call), peak RSS after loading
and after compression, and perplexity. ``smollm2.py --reference`` starts it once per run:

    /path/to/venv/bin/python benchmarks/smollm2_reference.py --run gptq_w4a16_g64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch
from smollm2_scoring import peak_rss_mib, score, token_nll

RUNS = (
    "fp",
    "rtn_w4a16_g64",
    "gptq_w4a16_g64",
    "rtn_w8a8",
    "sparsegpt_50",
    "sparsegpt_2of4",
    "wanda_50",
    "smoothquant_gptq_w8a8",
    "awq_w4a16_g64",
    "sparsegpt_2of4_gptq_w4a16_g64",
)
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lightning-compress" / "smollm2-135m"
SEQ_LEN = 512
W4_G64 = {
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

# W4AFP8 with groups of 64: the preset's groups of 128 do not divide SmolLM2's 576 input
# features (llm-compressor quantizes a ragged last group, with a warning; we refuse such layers)
W4AFP8_G64 = {
    "group_0": {
        "targets": ["Linear"],
        "weights": {**W4_G64["group_0"]["weights"]},
        "input_activations": {
            "num_bits": 8,
            "type": "float",
            "symmetric": True,
            "strategy": "token",
            "dynamic": True,
        },
    }
}
# fp8 keys and values, one static scale per tensor calibrated on the calibration windows
FP8_KV = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}
LINEAR = ["Linear"]
# Scheme runs: run name -> (algorithm, the modifier's scheme arguments), built alike on both
# sides (``scheme_recipe``), every Linear but lm_head, the algorithm's defaults otherwise
KV_OBSERVERS = ("minmax", "moving_average", "mse")
"""The observers a scheme run's ``kv_cache_scheme`` may name (``--kv-observer``)."""

SCHEME_RUNS: dict[str, tuple[str, dict[str, Any]]] = {
    "rtn_nvfp4a16": ("rtn", {"scheme": "NVFP4A16", "targets": LINEAR}),
    "gptq_nvfp4a16": ("gptq", {"scheme": "NVFP4A16", "targets": LINEAR}),
    "rtn_mxfp4a16": ("rtn", {"scheme": "MXFP4A16", "targets": LINEAR}),
    "gptq_mxfp4a16": ("gptq", {"scheme": "MXFP4A16", "targets": LINEAR}),
    "rtn_fp8_dynamic": ("rtn", {"scheme": "FP8_DYNAMIC", "targets": LINEAR}),
    "rtn_w4afp8_g64": ("rtn", {"config_groups": W4AFP8_G64}),
    "gptq_w4afp8_g64": ("gptq", {"config_groups": W4AFP8_G64}),
    "rtn_nvfp4": ("rtn", {"scheme": "NVFP4", "targets": LINEAR}),
    "gptq_nvfp4": ("gptq", {"scheme": "NVFP4", "targets": LINEAR}),
    "fp8_kv": ("rtn", {"scheme": "FP8_DYNAMIC", "targets": LINEAR, "kv_cache_scheme": FP8_KV}),
}
RUNS += tuple(SCHEME_RUNS)


def scheme_recipe(
    run: str, rtn: type, gptq: type, kv_observer: str | None = None, **settings: Any
) -> list[Any]:
    """The modifiers of a scheme run (``SCHEME_RUNS``), built from either side's classes.

    Args:
        run: a key of ``SCHEME_RUNS``.
        rtn: the side's ``QuantizationModifier``.
        gptq: the side's ``GPTQModifier``.
        kv_observer: the ``observer`` of the run's ``kv_cache_scheme`` (None: the side's
            default).
        settings: further settings of the modifier (one side's own).

    Returns:
        One modifier: the run's scheme on every ``Linear`` but ``lm_head``.
    """
    algorithm, arguments = SCHEME_RUNS[run]
    if kv_observer is not None and "kv_cache_scheme" in arguments:
        kv_cache = {**arguments["kv_cache_scheme"], "observer": kv_observer}
        arguments = {**arguments, "kv_cache_scheme": kv_cache}
    modifier = {"rtn": rtn, "gptq": gptq}[algorithm]
    return [modifier(**arguments, **settings, ignore=["lm_head"])]


def recipe(run: str, kv_observer: str | None = None) -> list[Any]:
    """llm-compressor's modifiers for ``run`` (empty for ``fp``), with ``kv_observer`` as the
    ``observer`` of a scheme run's ``kv_cache_scheme`` (None: llm-compressor's default)."""
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    from llmcompressor.modifiers.transform import AWQModifier

    if run in SCHEME_RUNS:
        return scheme_recipe(run, QuantizationModifier, GPTQModifier, kv_observer)
    ignore = ["lm_head"]
    # actorder, block size and dampening left at llm-compressor's defaults (static, 128, 0.01)
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
        "smoothquant_gptq_w8a8": lambda: [
            SmoothQuantModifier(smoothing_strength=0.8),
            GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore),
        ],
        "awq_w4a16_g64": lambda: [
            AWQModifier(),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", choices=RUNS, required=True)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-observer", choices=KV_OBSERVERS)
    args = parser.parse_args()
    cache_dir = args.cache_dir.expanduser()

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    modifiers = recipe(args.run, args.kv_observer)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=torch.float32).eval()
    windows = torch.load(cache_dir / "windows.pt", weights_only=True)
    error = (token_nll(model, windows["fingerprint_ids"])[0] - windows["fingerprint_nll"]).abs()
    if error.max().item() > 1e-3:
        raise RuntimeError(f"model differs from the prepared one (NLL diff {error.max():.2e})")
    calibration = windows["calibration"][: args.calibration_windows]
    evaluation = windows["evaluation"][: args.eval_windows]
    if len(calibration) < args.calibration_windows or len(evaluation) < args.eval_windows:
        raise ValueError("the cache holds fewer windows than asked for")
    rss_loaded = peak_rss_mib()
    seconds = None
    if modifiers:
        from datasets import Dataset
        from llmcompressor import oneshot

        begin = time.perf_counter()
        oneshot(
            model=model,
            recipe=modifiers,
            dataset=Dataset.from_dict({"input_ids": calibration.tolist()}),
            num_calibration_samples=len(calibration),
            max_seq_length=SEQ_LEN,
            shuffle_calibration_samples=False,
        )
        seconds = time.perf_counter() - begin
    measured = {
        "run": args.run,
        "side": "reference",
        "compress_s": seconds,
        "rss_loaded_mib": rss_loaded,
        "rss_compressed_mib": peak_rss_mib(),
    }
    result = score(model, evaluation, measured)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
