"""One-shot compression with the blocks on a CUDA device while the model stays on the CPU.

A random Llama (``--hidden``, ``--layers``) is calibrated on random tokens with each one-shot
recipe twice: blocks on the CPU and blocks on ``cuda``. The script checks that the model's
parameters are back on the CPU afterwards and that the two runs compress alike: the share of
equal integer codes (quantized) or masks (pruned), and each compressed model's logit error
against the uncompressed model, CUDA over CPU. Float rounding differs between the devices,
so codes flip, and in GPTQ and SparseGPT each flip feeds back into the later columns: the
check is that the errors stay within 10% of each other. It also times the
staged pipeline (one forward per block) beside the two-pass one on the device. It prints a
Markdown table and exits non-zero when a check fails.

    python benchmarks/cuda_check.py [--hidden 1024 --layers 4 --samples 16 --seq 256]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers import (
    GPTQModifier,
    QuantizationModifier,
    SparseGPTModifier,
    WandaPruningModifier,
)

W4_G64 = {
    "w4": {"targets": ["Linear"], "weights": {"num_bits": 4, "strategy": "group", "group_size": 64}}
}
RECIPES: dict[str, Callable[[], list[Any]]] = {
    "gptq_w4a16_g64": lambda: [GPTQModifier(config_groups=W4_G64, ignore=["lm_head"])],
    "rtn_w8a8_dynamic": lambda: [
        QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=["lm_head"])
    ],
    "sparsegpt_2of4": lambda: [
        SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["lm_head"])
    ],
    "wanda_50": lambda: [WandaPruningModifier(sparsity=0.5, ignore=["lm_head"])],
}


def model_and_batches(args: argparse.Namespace) -> tuple[nn.Module, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 256 or 1,
        vocab_size=1000,
        max_position_embeddings=args.seq,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 1000, (args.samples, args.seq))
    return model, [{"input_ids": row[None]} for row in ids]


def calibrate(model: nn.Module, run: str, batches: list, device: str, staged: bool) -> float:
    module = CalibrationModule(model, RECIPES[run](), device=device, staged=staged)
    begin = time.perf_counter()
    module.calibrate(batches)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - begin


def logits(model: nn.Module, batches: list) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**batch).logits for batch in batches[:2]])


def codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each compressed linear's integer codes (quantized) or its kept-weight mask (pruned)."""
    result = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        weight = module.weight.detach()
        scale = getattr(module, "weight_scale", None)
        if scale is None:
            result[name] = (weight != 0).float()
            continue
        scale = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
        result[name] = torch.round(weight / scale)
    return result


def compare(cpu: nn.Module, cuda: nn.Module, fp_logits: torch.Tensor, batches: list) -> tuple:
    """Share of equal codes, largest code difference, and the CUDA run's logit error over
    the CPU run's (both against the uncompressed model)."""
    cpu_codes, cuda_codes = codes(cpu), codes(cuda)
    equal = sum(int((cpu_codes[k] == cuda_codes[k]).sum()) for k in cpu_codes)
    total = sum(t.numel() for t in cpu_codes.values())
    largest = max(float((cpu_codes[k] - cuda_codes[k]).abs().max()) for k in cpu_codes)
    cpu_error = (logits(cpu, batches) - fp_logits).norm()
    cuda_error = (logits(cuda, batches) - fp_logits).norm()
    return equal / total, largest, (cuda_error / cpu_error).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--runs", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    base, batches = model_and_batches(args)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, random Llama hidden "
        f"{args.hidden} x {args.layers} layers, {args.samples} x {args.seq} tokens\n"
    )
    print(
        "| run | CPU (s) | CUDA staged (s) | CUDA two-pass (s) | codes or masks equal "
        "| largest code difference | logit error CUDA / CPU | model on CPU |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    fp_logits = logits(base, batches)
    failures = []
    for run in args.runs:
        on_cpu, staged, two_pass = (copy.deepcopy(base) for _ in range(3))
        cpu_s = calibrate(on_cpu, run, batches, "cpu", staged=True)
        staged_s = calibrate(staged, run, batches, "cuda", staged=True)
        two_pass_s = calibrate(two_pass, run, batches, "cuda", staged=False)
        stays = all(t.device.type == "cpu" for t in (*staged.parameters(), *staged.buffers()))
        equal, largest, error_ratio = compare(on_cpu, staged, fp_logits, batches)
        print(
            f"| {run} | {cpu_s:.1f} | {staged_s:.1f} | {two_pass_s:.1f} | {equal:.2%} "
            f"| {largest:.0f} | {error_ratio:.3f} | {stays} |",
            flush=True,
        )
        if not stays or not 0.9 < error_ratio < 1.1:
            failures.append(run)
    if failures:
        print(f"\nFAILED: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
