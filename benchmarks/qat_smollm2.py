"""Quantization-aware training of SmolLM2-135M beside one-shot RTN and GPTQ of the same scheme.

The model, windows and scoring of ``smollm2.py`` (run ``python benchmarks/smollm2.py prepare``
once): perplexity over the first 16 evaluation windows of 512 tokens. Training sees the
calibration text only: its windows but the last ``--holdout`` ones (shuffled, ``--batch``
windows a step), and those held-out windows choose the learning rate (``--sweep``); the
evaluation windows are scored once per run, never used to choose anything. Per scheme
(``w4a16_g64``: symmetric int4 in groups of 64, the table's W4 g64; ``nvfp4a16``: the
``NVFP4A16`` preset), every ``Linear`` but ``lm_head``:

- ``fp`` and ``fp_ft``: the float model, and the same model after the same training without
  quantization (what fine-tuning on this text alone gains);
- ``rtn``: round-to-nearest (``QuantizationModifier``, one-shot);
- ``gptq``: GPTQ on the first 32 calibration windows (defaults: actorder static, block 128,
  dampening 0.01), as in ``smollm2.py``;
- ``qat``: ``Trainer.fit`` with ``Compressor([QuantizationModifier(..., start=0)])``: the
  weights are fake-quantized on every forward with min-max scales that follow the weight
  (at step 0 exactly RTN's), AdamW on all parameters, cosine decay after a 10% warm-up;
  at the end the weights are baked to the grid;
- ``gptq_qat``: GPTQ, then the same training starting from GPTQ's weights *and scales*, in two
  steps: the one-shot model's quantized weights are copied into a fresh model, and its scales
  are written into the training modifier's qparam buffers, which stay frozen from the first
  step (``freeze_observers``), so training starts exactly at the GPTQ model and stays on its
  grid. One recipe can also do this in one ``Trainer.fit``
  (``Compressor([GPTQModifier(...), QuantizationModifier(..., start=0)])`` runs GPTQ before
  the first step and trains on its scales): that is ``qad_smollm2.py``'s ``gptq_qat`` row.

After each trained run the model is saved with ``save_compressed`` and reloaded with
transformers; the reloaded perplexity is printed beside the one in memory. fp4 checkpoints
are bfloat16 only, so an NVFP4A16 model is cast to bfloat16 and round-to-nearest quantized
again first (the trained weights lie on the grid, so this picks their scales and codes again);
its export row compares the bfloat16 model in memory with the reloaded one.

    python benchmarks/qat_smollm2.py --sweep 3e-5 1e-4 3e-4 --sweep-steps 30 --runs
    python benchmarks/qat_smollm2.py --schemes w4a16_g64 nvfp4a16 --steps 60 --lr 1e-4

Prints a Markdown table: run, training tokens (steps x batch x 512), wall time (one-shot call
or ``Trainer.fit``), perplexity, and the export check.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from smollm2_model import DEFAULT_CACHE_DIR, SEQ_LEN, is_prepared, load_model, load_windows
from smollm2_reference import W4_G64
from smollm2_scoring import window_nll
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress.lightning.language_model import CausalLMModule

SCHEMES = ("w4a16_g64", "nvfp4a16")
RUN_KINDS = ("fp", "fp_ft", "rtn", "gptq", "qat", "gptq_qat")
IGNORE = ["lm_head"]
WARMUP = 0.1
# freeze_observers must lie after start=0; schedules compare indices with a 1e-9 tolerance,
# so this index is reached by the first batch: the qparams never change
FROZEN_FROM_FIRST_BATCH = 1e-9
QPARAMS = ("weight_scale", "weight_zero_point", "weight_global_scale")


def scheme_kwargs(scheme: str) -> dict[str, Any]:
    """The ``QuantizationModifier`` / ``GPTQModifier`` arguments of ``scheme``."""
    if scheme == "w4a16_g64":
        return {"config_groups": W4_G64, "ignore": IGNORE}
    if scheme == "nvfp4a16":
        return {"scheme": "NVFP4A16", "targets": ["Linear"], "ignore": IGNORE}
    raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")


# ------------------------------------------------------------------ one-shot
def one_shot(
    model: nn.Module, scheme: str, algorithm: str, calibration: torch.Tensor | None
) -> float:
    """Quantize ``model`` with RTN or GPTQ through ``oneshot``; return the seconds it took.

    Args:
        model: the model, quantized in place.
        scheme: the scheme's name.
        algorithm: ``rtn`` or ``gptq``.
        calibration: GPTQ's calibration windows (RTN runs data-free and ignores them).

    Returns:
        Seconds.
    """
    from lightning_compress import oneshot
    from lightning_compress.modifiers import GPTQModifier, QuantizationModifier

    modifier = {"rtn": QuantizationModifier, "gptq": GPTQModifier}[algorithm]
    begin = time.perf_counter()
    oneshot(
        model,
        [modifier(**scheme_kwargs(scheme))],
        dataset=calibration if algorithm == "gptq" else None,
        num_calibration_samples=None,
        max_seq_length=SEQ_LEN,
        device="cpu",
        trainer_kwargs={"enable_progress_bar": False},
    )
    return time.perf_counter() - begin


def quantized_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Each quantized layer's weight and qparams, by layer name (copies)."""
    return {
        name: {
            key: value.detach().clone()
            for key in ("weight", *QPARAMS)
            if (value := getattr(module, key, None)) is not None
        }
        for name, module in model.named_modules()
        if hasattr(module, "weight_scale")
    }


# ------------------------------------------------------------------ training
class WarmupCosineLM(CausalLMModule):
    """``CausalLMModule`` with a linear warm-up then cosine decay of the learning rate.

    Args:
        model: the language model.
        lr: peak AdamW learning rate.
        total_steps: optimizer steps of the run.
    """

    def __init__(self, model: nn.Module, lr: float, total_steps: int) -> None:
        super().__init__(model, lr=lr)
        self.total_steps = total_steps

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)
        warmup = max(1, round(WARMUP * self.total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, self.total_steps - warmup)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


class StartFromOneShot(pl.Callback):
    """Writes one-shot qparams into the training modifier's buffers before training starts,
    and checks at the first batch that every fake-quantized weight equals the one-shot one.

    Put it after the ``Compressor`` (which adds the buffers at ``setup`` and switches fake
    quantization on at the first batch).

    Args:
        state: ``quantized_state`` of the one-shot model.
    """

    def __init__(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.state = state

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, module in self._layers(pl_module):
            with torch.no_grad():
                for key in QPARAMS:
                    if key in self.state[name]:
                        getattr(module, key).copy_(self.state[name][key])

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > 0:
            return
        for name, module in self._layers(pl_module):
            with torch.no_grad():
                error = (module.weight - self.state[name]["weight"]).abs().max().item()
            if error != 0:
                raise RuntimeError(f"{name}: training starts {error:.3g} away from GPTQ's weight")

    def _layers(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        layers = [(name, pl_module.model.get_submodule(name)) for name in self.state]
        missing = [name for name, module in layers if not hasattr(module, "weight_scale")]
        if missing:
            raise RuntimeError(f"layers without training qparams: {missing[:4]}")
        return layers


class StepTimes(pl.Callback):
    """Logs the training loss and seconds per step every ``every`` steps (to stderr).

    Args:
        every: optimizer steps between lines.
    """

    def __init__(self, every: int) -> None:
        self.every = every
        self.begin = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any
    ) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            seconds = (time.perf_counter() - self.begin) / step
            loss = float(outputs["loss"])
            print(f"step {step}: loss {loss:.4f}, {seconds:.1f} s/step", file=sys.stderr)


def cpu_trainer(steps: int, callbacks: list[pl.Callback]) -> pl.Trainer:
    """The benchmarks' Trainer: ``steps`` optimizer steps on the CPU, gradients clipped at
    norm 1, no validation, logging, checkpoints or progress bar.

    Args:
        steps: the optimizer steps.
        callbacks: its callbacks.

    Returns:
        The Trainer.
    """
    return pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        gradient_clip_val=1.0,
    )


def train(
    model: nn.Module,
    scheme: str | None,
    data: torch.Tensor,
    args: argparse.Namespace,
    lr: float,
    steps: int,
    start_from: dict[str, dict[str, torch.Tensor]] | None = None,
) -> float:
    """QAT of ``model`` on ``data`` for ``steps`` steps; return the seconds ``fit`` took.

    Args:
        model: the model, trained in place (baked to the grid at the end).
        scheme: the scheme's name; None fine-tunes without quantization (no ``Compressor``).
        data: training windows ``[N, 512]``.
        args: the command line (batch, seed).
        lr: peak learning rate.
        steps: optimizer steps.
        start_from: one-shot qparams to start from and keep (frozen); None for min-max
            qparams that follow the weight.

    Returns:
        Seconds.
    """
    from lightning_compress import Compressor
    from lightning_compress.modifiers import QuantizationModifier

    callbacks: list[pl.Callback] = [StepTimes(args.log_every)]
    if scheme is not None:
        freeze = {} if start_from is None else {"freeze_observers": FROZEN_FROM_FIRST_BATCH}
        modifier = QuantizationModifier(**scheme_kwargs(scheme), start=0, **freeze)
        callbacks.insert(0, Compressor([modifier]))
    if start_from is not None:
        callbacks.append(StartFromOneShot(start_from))
    trainer = cpu_trainer(steps, callbacks)
    generator = torch.Generator().manual_seed(args.seed)
    loader = DataLoader(data, args.batch, shuffle=True, generator=generator, drop_last=True)
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    trainer.fit(WarmupCosineLM(model.train(), lr, steps), loader)
    seconds = time.perf_counter() - begin
    model.eval()
    return seconds


# ------------------------------------------------------------------ export
def export_perplexities(
    model: nn.Module, scheme: str, evaluation: torch.Tensor, in_memory: float
) -> tuple[float, float]:
    """Save ``model`` compressed, reload it with transformers, score the reloaded model.

    NVFP4 is saved in bfloat16 (the only dtype compressed-tensors reads fp4 back in): the
    trained weights are cast and quantized round-to-nearest again, and that bfloat16 model is
    scored too and compared.

    Args:
        model: the trained model.
        scheme: the scheme's name.
        evaluation: the evaluation windows.
        in_memory: ``model``'s perplexity (the saved model's, unless NVFP4).

    Returns:
        ``(perplexity of the model saved, perplexity reloaded)``.
    """
    from transformers import AutoModelForCausalLM

    from lightning_compress.export import save_compressed

    if scheme == "nvfp4a16":
        model = _requantized_bfloat16(model, scheme)
        in_memory = perplexity(model, evaluation)
    with tempfile.TemporaryDirectory() as folder:
        save_compressed(model, folder, progress=False)
        reloaded = AutoModelForCausalLM.from_pretrained(folder, dtype=model.dtype).eval()
        return in_memory, perplexity(reloaded, evaluation)


def _requantized_bfloat16(trained: nn.Module, scheme: str) -> nn.Module:
    """A bfloat16 copy of the base model holding ``trained``'s weights, quantized by RTN."""
    model = load_model(DEFAULT_CACHE_DIR)
    model.load_state_dict(trained.state_dict(), strict=False)
    model.to(torch.bfloat16)
    one_shot(model, scheme, "rtn", None)
    return model


# ------------------------------------------------------------------ runs
def perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """``exp`` of the mean next-token NLL over ``windows`` (``smollm2.py``'s scoring)."""
    return window_nll(model, windows).mean().exp().item()


def run_one(
    kind: str, scheme: str, windows: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, Any]:
    """Run ``kind`` (``RUN_KINDS``) of ``scheme`` on a fresh model; return its table row."""
    model = load_model(args.cache_dir)
    steps, seconds = 0, None
    if kind in ("rtn", "gptq"):
        seconds = one_shot(model, scheme, kind, windows["calibration"])
    elif kind == "fp_ft":
        steps = args.steps
        seconds = train(model, None, windows["train"], args, args.lr, steps)
    elif kind == "qat":
        steps = args.steps
        seconds = train(model, scheme, windows["train"], args, args.lr, steps)
    elif kind == "gptq_qat":
        steps = args.steps
        seconds = one_shot(model, scheme, "gptq", windows["calibration"])
        start = quantized_state(model)
        model = load_model(args.cache_dir)
        model.load_state_dict(
            {f"{name}.weight": s["weight"] for name, s in start.items()}, strict=False
        )
        seconds += train(model, scheme, windows["train"], args, args.lr, steps, start)
    row = {
        "run": kind if kind.startswith("fp") else f"{kind}_{scheme}",
        "train_tokens": steps * args.batch * SEQ_LEN,
        "seconds": seconds,
        "perplexity": perplexity(model, windows["evaluation"]),
    }
    print(json.dumps(row), flush=True)
    if kind in ("qat", "gptq_qat") and not args.no_export:
        row["export_in_memory"], row["export_reloaded"] = export_perplexities(
            model, scheme, windows["evaluation"], row["perplexity"]
        )
        print(json.dumps(row), flush=True)
    return row


def sweep(windows: dict[str, torch.Tensor], args: argparse.Namespace) -> list[dict[str, Any]]:
    """QAT of ``args.sweep_scheme`` at each ``--sweep`` learning rate, scored on the held-out
    calibration windows only."""
    rows = []
    for lr in args.sweep:
        model = load_model(args.cache_dir)
        seconds = train(model, args.sweep_scheme, windows["train"], args, lr, args.sweep_steps)
        held_out = perplexity(model, windows["holdout"])
        rows.append({"lr": lr, "steps": args.sweep_steps, "seconds": seconds, "holdout": held_out})
        print(
            f"lr {lr:g}: held-out calibration perplexity {held_out:.2f} ({seconds:.0f} s)",
            flush=True,
        )
    return rows


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the runs as a Markdown table."""
    print(
        f"\nSmolLM2-135M, CPU, {args.threads} threads; QAT: {args.steps} steps x {args.batch} x "
        f"{SEQ_LEN} tokens of calibration text, AdamW lr {args.lr:g}; perplexity over "
        f"{args.eval_windows} x {SEQ_LEN} evaluation tokens\n"
    )
    print("| run | train tokens | time (s) | perplexity | saved → reloaded |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        seconds = "-" if row["seconds"] is None else f"{row['seconds']:.0f}"
        export = "-"
        if "export_reloaded" in row:
            export = f"{row['export_in_memory']:.2f} → {row['export_reloaded']:.2f}"
        print(
            f"| {row['run']} | {row['train_tokens']:,} | {seconds} | {row['perplexity']:.2f} "
            f"| {export} |",
            flush=True,
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--schemes", nargs="+", choices=SCHEMES, default=list(SCHEMES))
    parser.add_argument("--runs", nargs="*", choices=RUN_KINDS, default=list(RUN_KINDS))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per QAT run")
    parser.add_argument("--batch", type=int, default=1, help="windows of 512 tokens per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=10, help="steps between log lines")
    parser.add_argument(
        "--sweep", nargs="+", type=float, help="learning rates to compare on held-out windows"
    )
    parser.add_argument("--sweep-steps", type=int, default=30)
    parser.add_argument("--sweep-scheme", choices=SCHEMES, default="w4a16_g64")
    parser.add_argument(
        "--holdout", type=int, default=16, help="last calibration windows kept from training"
    )
    parser.add_argument("--calibration-windows", type=int, default=32, help="GPTQ's")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-export", action="store_true", help="skip the save/reload check")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    args.cache_dir = args.cache_dir.expanduser()
    return args


def main() -> None:
    from loguru import logger

    args = parse_args()
    if not is_prepared(args.cache_dir):
        raise SystemExit("run `python benchmarks/smollm2.py prepare` first")
    torch.set_num_threads(args.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    saved = load_windows(args.cache_dir)
    calibration = saved["calibration"]
    windows = {
        "calibration": calibration[: args.calibration_windows],
        "train": calibration[: -args.holdout],
        "holdout": calibration[-args.holdout :],
        "evaluation": saved["evaluation"][: args.eval_windows],
    }
    results: dict[str, Any] = {}
    if args.sweep:
        results["sweep"] = sweep(windows, args)
        best = min(results["sweep"], key=lambda row: row["holdout"])
        print(f"best learning rate on the held-out calibration windows: {best['lr']:g}")
        if not args.runs:
            return
    rows = []
    plan = [(kind, "") for kind in ("fp", "fp_ft") if kind in args.runs]
    plan += [
        (kind, scheme) for scheme in args.schemes for kind in args.runs if not kind.startswith("fp")
    ]
    for kind, scheme in plan:
        rows.append(run_one(kind, scheme, windows, args))
    results["runs"] = rows
    print_table(rows, args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
