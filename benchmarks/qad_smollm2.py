"""SmolLM2-135M: GPTQ, then quantization-aware training (QAT) or distillation (QAD), in one run.

The model, windows and scoring of ``smollm2.py`` (run ``python benchmarks/smollm2.py prepare``
once). Every trained row is one ``Trainer.fit`` of a ``CausalLMModule`` (``qat_smollm2.py``'s
warm-up-then-cosine subclass) on a ``TextDataModule`` of the calibration text, with one
``Compressor`` recipe, as a user runs it:

- ``gptq_qat``: ``[GPTQModifier(<scheme>), QuantizationModifier(<scheme>, start=0)]``: GPTQ
  runs once, before the first step, on the first ``--calibration-windows`` calibration windows
  (``Compressor(calibration_data=...)``, the windows the ``gptq`` row uses), then QAT trains
  from GPTQ's weights on GPTQ's grid (its scales stay fixed);
- ``gptq_qad``: the same plus ``OutputDistillationModifier`` (KL on the logits at temperature
  1 plus the MSE of each decoder block's output, the best mix of ``qad_loss_mix.py``, weighted
  ``--hardness`` against the next-token loss: 0.5 by default, 1 distils only), with
  ``Compressor(teacher="uncompressed")``: a frozen copy of the model made before GPTQ changes it;
- ``fp_ft``: the same training of the float model, with no ``Compressor``: what fine-tuning on
  this text alone changes.

``fp``, ``rtn`` and ``gptq`` are the one-shot rows (``qat_smollm2.one_shot``). The training text
is the calibration text's windows but the last ``--holdout`` (those choose the learning rate:
each row's ``holdout`` perplexity), shuffled with ``--seed``, ``--batch`` windows of 512 tokens
a step, so every trained row sees ``steps x batch x 512`` tokens; AdamW on all parameters, peak
``--lr`` after a 10% linear warm-up, cosine decay, gradients clipped at 1.0. Each row is scored
on the 16 held-out evaluation windows of the novel (``austen``) and on 16 windows of 512 tokens
of another domain, the start of Genesis in the World English Bible
(``benchmarks/data/web_bible/genesis.txt``, public domain: ``bible``). Each row runs in its own
process, so its peak resident memory (``ru_maxrss``) is its own; ``s/step`` is the mean time of
the training steps after the first (GPTQ and the teacher's copy excluded), in wall time and in
the process's CPU time (with one thread the CPU time is what a step costs, even on a busy
machine).

    python benchmarks/qad_smollm2.py --steps 60 --lr 1e-4 --threads 1 --json rows.jsonl
    python benchmarks/qad_smollm2.py --runs gptq_qad --lr 3e-5 --threads 1 --json rows.jsonl
    python benchmarks/qad_smollm2.py --runs gptq_qad --hardness 1 --threads 1 --json rows.jsonl
    python benchmarks/qad_smollm2.py --table rows.jsonl --steps 60 --lr 1e-4 --threads 1

Prints each row as JSON, then a Markdown table (``--table`` prints the table of saved rows; the
table's title takes the other options as given; rows of one run that differ in learning rate,
seed or hardness are told apart by them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from qat_smollm2 import (
    SCHEMES,
    WarmupCosineLM,
    cpu_trainer,
    one_shot,
    perplexity,
    scheme_kwargs,
)
from smollm2_model import DEFAULT_CACHE_DIR, SEQ_LEN, is_prepared, load_model, load_windows
from smollm2_scoring import peak_rss_mib
from torch import nn

RUN_KINDS = ("fp", "rtn", "gptq", "fp_ft", "gptq_qat", "gptq_qad")
OTHER_DOMAIN = Path(__file__).resolve().parent / "data" / "web_bible" / "genesis.txt"
BLOCKS = "LlamaDecoderLayer"
# qad_loss_mix.py's best mix: KL at temperature 1 plus each block's output MSE.
QAD_MIX = {"temperature": 1.0, "layer_targets": [BLOCKS]}
DEFAULT_HARDNESS = 0.5  # the distillation term's weight, qad_loss_mix.py's best


class StepClock(pl.Callback):
    """Records when each training step ends, in wall time and in this process's CPU time."""

    def __init__(self) -> None:
        self.ends: list[tuple[float, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.ends.append((time.perf_counter(), time.process_time()))

    def per_step(self) -> dict[str, float]:
        """Mean wall and CPU seconds between the ends of consecutive steps (the first step
        excluded): ``s_per_step`` and ``cpu_s_per_step``."""
        if len(self.ends) < 2:
            raise RuntimeError(f"StepClock: {len(self.ends)} step(s) ran; expected at least 2")
        (wall0, cpu0), (wall1, cpu1) = self.ends[0], self.ends[-1]
        steps = len(self.ends) - 1
        return {"s_per_step": (wall1 - wall0) / steps, "cpu_s_per_step": (cpu1 - cpu0) / steps}


def recipe(kind: str, scheme: str, hardness: float = DEFAULT_HARDNESS) -> list[Any]:
    """The ``Compressor`` recipe of a trained row: GPTQ, then QAT, with distillation for QAD.

    Args:
        kind: the row (``gptq_qat`` or ``gptq_qad``).
        scheme: the quantization scheme (``SCHEMES``).
        hardness: the distillation term's weight in QAD's loss (1 = distillation only).

    Returns:
        The modifiers, in order.
    """
    from lightning_compress.modifiers import (
        GPTQModifier,
        OutputDistillationModifier,
        QuantizationModifier,
    )

    modifiers = [
        GPTQModifier(**scheme_kwargs(scheme)),
        QuantizationModifier(**scheme_kwargs(scheme), start=0),
    ]
    if kind == "gptq_qad":
        modifiers.append(OutputDistillationModifier(**QAD_MIX, hardness=hardness))
    return modifiers


def train(
    model: nn.Module, kind: str, windows: dict[str, torch.Tensor], args: argparse.Namespace
) -> dict[str, float]:
    """Train ``model`` as row ``kind`` (``fp_ft``, ``gptq_qat``, ``gptq_qad``) in one fit.

    Args:
        model: the float model, trained in place.
        kind: the row.
        windows: ``train_and_holdout`` (the calibration windows the data module splits) and
            ``calibration`` (GPTQ's).
        args: the command line.

    Returns:
        ``fit_s`` (the whole ``Trainer.fit``, GPTQ included), ``s_per_step`` and
        ``cpu_s_per_step`` (``StepClock.per_step``).
    """
    from lightning_compress import Compressor
    from lightning_compress.lightning.text_data import TextDataModule

    clock = StepClock()
    callbacks: list[pl.Callback] = [clock]
    if kind != "fp_ft":
        compressor = Compressor(
            recipe(kind, args.scheme, args.hardness),
            teacher="uncompressed" if kind == "gptq_qad" else None,
            calibration_data=list(windows["calibration"].split(1)),
            num_calibration_batches=len(windows["calibration"]),
        )
        callbacks.insert(0, compressor)
    trainer = cpu_trainer(args.steps, callbacks)
    calibration = windows["train_and_holdout"]
    data = TextDataModule(
        tokens=calibration,
        seq_len=SEQ_LEN,
        batch_size=args.batch,
        val_fraction=args.holdout / len(calibration),
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    begin = time.perf_counter()
    trainer.fit(WarmupCosineLM(model.train(), args.lr, args.steps), datamodule=data)
    seconds = time.perf_counter() - begin
    model.eval()
    return {"fit_s": seconds, **clock.per_step()}


def other_domain_windows(cache_dir: Path, count: int) -> torch.Tensor:
    """The first ``count`` windows of 512 tokens of the other-domain text."""
    from transformers import AutoTokenizer

    from lightning_compress.bundled import token_windows

    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return token_windows(OTHER_DOMAIN.read_text(encoding="utf-8"), tokenizer, SEQ_LEN, count)


def worker(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run row ``kind`` on a fresh model in this process; return the row."""
    saved = load_windows(args.cache_dir)
    calibration = saved["calibration"]
    windows = {
        "calibration": calibration[: args.calibration_windows],
        "train_and_holdout": calibration,
        "holdout": calibration[-args.holdout :],
        "austen": saved["evaluation"][: args.eval_windows],
        "bible": other_domain_windows(args.cache_dir, args.eval_windows),
    }
    model = load_model(args.cache_dir)
    row: dict[str, Any] = {"run": kind, "scheme": args.scheme, "rss_loaded_mib": peak_rss_mib()}
    if kind in ("rtn", "gptq"):
        row["one_shot_s"] = one_shot(model, args.scheme, kind, windows["calibration"])
    elif kind != "fp":
        row.update(train(model, kind, windows, args))
        row.update(steps=args.steps, lr=args.lr, seed=args.seed)
        if kind == "gptq_qad":
            row["hardness"] = args.hardness
    row["train_tokens"] = row.get("steps", 0) * args.batch * SEQ_LEN
    row["rss_peak_mib"] = peak_rss_mib()
    for name in ("austen", "bible", "holdout"):
        row[name] = perplexity(model, windows[name])
    return row


def run_in_subprocess(kind: str) -> dict[str, Any]:
    """Run row ``kind`` in a fresh process with this command line; return its row."""
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", kind]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def settings(row: dict[str, Any]) -> dict[str, float]:
    """The training settings of a trained row: ``lr`` and ``seed``, and ``hardness`` for QAD.

    Rows saved before a setting was recorded ran at its default (seed 0, hardness 0.5).

    Args:
        row: a row of ``worker``.

    Returns:
        The settings, empty for a one-shot row.
    """
    if "steps" not in row:
        return {}
    found = {"lr": row["lr"], "seed": row.get("seed", 0)}
    if row["run"] == "gptq_qad":
        found["hardness"] = row.get("hardness", DEFAULT_HARDNESS)
    return found


def labels(rows: list[dict[str, Any]]) -> list[str]:
    """Each row's run, followed by the settings in which it differs from rows of the same run
    (``gptq_qad, lr 0.0003, hardness 1``), so that no two rows read alike."""
    values: dict[tuple[str, str], set[float]] = {}
    for row in rows:
        for key, value in settings(row).items():
            values.setdefault((row["run"], key), set()).add(value)
    return [
        ", ".join(
            [row["run"]]
            + [
                f"{key} {value:g}"
                for key, value in settings(row).items()
                if len(values[row["run"], key]) > 1
            ]
        )
        for row in rows
    ]


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the rows as a Markdown table, with the share of GPTQ's gap to FP each closes."""
    by_run = {row["run"]: row for row in rows}
    gap = None
    if "fp" in by_run and "gptq" in by_run:
        gap = by_run["gptq"]["austen"] - by_run["fp"]["austen"]
    print(
        f"\nSmolLM2-135M, {args.scheme}, CPU, {args.threads} thread(s); trained rows: "
        f"{args.steps} steps x {args.batch} x {SEQ_LEN} tokens of calibration text, "
        f"peak lr {args.lr:g}\n"
    )
    print(
        "| run | hardness | train tokens | Austen held-out | GPTQ's gap closed "
        "| Bible (other domain) | calibration hold-out | CPU s/step | peak RSS (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, row in zip(labels(rows), rows, strict=True):
        closed = ""
        if gap and row["run"] not in ("fp", "fp_ft"):
            closed = f"{(by_run['gptq']['austen'] - row['austen']) / gap:.0%}"
        hardness = settings(row).get("hardness")
        step = f"{row['cpu_s_per_step']:.2f}" if "cpu_s_per_step" in row else "-"
        print(
            f"| {label} | {'' if hardness is None else f'{hardness:g}'} "
            f"| {row['train_tokens']:,} | {row['austen']:.2f} | {closed} "
            f"| {row['bible']:.2f} | {row['holdout']:.2f} | {step} | {row['rss_peak_mib']:.0f} |"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scheme", choices=SCHEMES, default="w4a16_g64")
    parser.add_argument("--runs", nargs="+", choices=RUN_KINDS, default=list(RUN_KINDS))
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trained row")
    parser.add_argument("--batch", type=int, default=1, help="windows of 512 tokens per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="peak AdamW learning rate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--hardness",
        type=float,
        default=DEFAULT_HARDNESS,
        help="weight of the distillation term in gptq_qad's loss, in [0, 1] (1: distillation only)",
    )
    parser.add_argument(
        "--holdout", type=int, default=16, help="last calibration windows kept from training"
    )
    parser.add_argument("--calibration-windows", type=int, default=32, help="GPTQ's")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--json", type=Path, help="append the rows here, one JSON a line")
    parser.add_argument(
        "--table", type=Path, help="print the table of the rows saved with --json, run nothing"
    )
    parser.add_argument("--worker", choices=RUN_KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not 0.0 <= args.hardness <= 1.0:
        parser.error(f"--hardness: expected a weight in [0, 1], got {args.hardness:g}")
    args.cache_dir = args.cache_dir.expanduser()
    return args


def main() -> None:
    from loguru import logger

    args = parse_args()
    if args.table is not None:
        rows = [json.loads(line) for line in args.table.read_text().splitlines() if line]
        print_table(rows, args)
        return
    if not is_prepared(args.cache_dir):
        raise SystemExit("run `python benchmarks/smollm2.py prepare` first")
    torch.set_num_threads(args.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    if args.worker is not None:
        print(json.dumps(worker(args.worker, args)), flush=True)
        return
    rows = []
    for kind in args.runs:
        rows.append(run_in_subprocess(kind))
        print(json.dumps(rows[-1]), flush=True)
        if args.json is not None:
            with args.json.open("a") as out:
                out.write(json.dumps(rows[-1]) + "\n")
    print_table(rows, args)


if __name__ == "__main__":
    main()
