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
import resource
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

RUNS = ("fp", "rtn_w4a16_g64", "gptq_w4a16_g64", "rtn_w8a8")
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


def recipe(run: str) -> list[Any]:
    """llm-compressor's modifiers for ``run`` (empty for ``fp``)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    ignore = ["lm_head"]
    if run == "fp":
        return []
    if run == "rtn_w4a16_g64":
        return [QuantizationModifier(config_groups=W4_G64, ignore=ignore)]
    if run == "gptq_w4a16_g64":
        # actorder left at llm-compressor's default ("static")
        return [
            GPTQModifier(config_groups=W4_G64, ignore=ignore, block_size=128, dampening_frac=0.01)
        ]
    if run == "rtn_w8a8":
        return [QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)]
    raise ValueError(f"unknown run {run!r}; expected one of {RUNS}")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def token_nll(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihoods, ``[N, L - 1]``, of each window in ``ids``."""
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")


def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Mean next-token negative log-likelihood of each window, ``[N]`` (float64).

    The perplexity is ``exp`` of their mean (all windows have the same length).
    """
    model.eval()
    return torch.cat(
        [token_nll(model, batch).double().mean(dim=1) for batch in windows.split(batch_size)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", choices=RUNS, required=True)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cache_dir = args.cache_dir.expanduser()

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    modifiers = recipe(args.run)
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
    rss_compressed = peak_rss_mib()
    begin = time.perf_counter()
    nll = window_nll(model, evaluation)
    result = {
        "run": args.run,
        "side": "reference",
        "compress_s": seconds,
        "rss_loaded_mib": rss_loaded,
        "rss_compressed_mib": rss_compressed,
        "rss_final_mib": peak_rss_mib(),
        "perplexity": nll.mean().exp().item(),
        "mean_window_perplexity": nll.exp().mean().item(),
        "window_nll": nll.tolist(),
        "eval_s": time.perf_counter() - begin,
        "threads": torch.get_num_threads(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
