"""GPTQ's compression phase on 1 process against 2 DDP processes sharing the layer solves.

Calibrates a random bundled decoder (hidden 1024, MLP 2816, 16 / 4 heads, 4 blocks by default)
with GPTQ W4 g128 under a Lightning Trainer on the CPU, once with one process and once with
two (``ddp_fork``, gloo), one thread per process. Under DDP each layer is solved on one owner
rank and broadcast, a layer too costly for one rank in row slices on several
(``modifiers/layerwise_split.py``). Measures the compression phase: every
call that reduces a group's Hessians, solves its layers and shares the results
(``LayerwiseModifier.compute_layers``, entered by the ranks together, so the wait for a rank
still running its forwards is left out), as wall-clock time on rank 0 and as CPU time on the
busiest rank (which a machine loaded by other jobs disturbs less); the CPU time of the solves
alone (``_compute_stack``) on the busiest rank, and summed over the calls of the slowest rank
in each (the ranks wait for each other at the end of every call, so this is the time the
solves take on ranks with a core each); and the whole run's wall-clock time. Checks that both
runs give the same weights, bit for bit.

    python benchmarks/parallel_solve.py [--layers 4] [--hidden 1024] [--intermediate 2816]
        [--samples 16] [--seq 128] [--staged both|yes|no] [--repeats 1] [--calls]
        [--experts 0] [--routed] [--twin]

``--experts N`` (N > 0) calibrates a random transformers Qwen3-MoE instead (the same hidden
size, heads and depth; N experts of ``--intermediate`` each, two per token, routers left
unquantized as compressed-tensors recipes leave them): a mixture's experts are many
independent layers of one size, which the owners can share out evenly. By default every
expert is calibrated on every token (as ``oneshot`` does), so all experts' gate/up projections
share one Hessian and are solved in one call; ``--routed`` calibrates each on its routed tokens
(``moe_calibrate_all_experts=False``): one Hessian, and one call, per expert.

``--twin`` also times one process while a copy of it runs on the other core (two separate
one-process calibrations started together, the slower one's times): two ranks can at best
take half of that, since they run side by side as the twins do and slow each other down the
same way (shared caches and memory bandwidth; on a virtual machine also the host), which one
process alone never meets. Prints a second table: the busiest rank's solve CPU time and the
solves' critical path for one process alone, one beside its twin and two DDP processes.

``--calls`` also prints, for each run, the solve CPU time of each rank per kind of layer
(``self_attn.q_proj+k_proj+v_proj``, ``mlp.down_proj[0:512]``: a row slice), summed over the
blocks, from the last repeat.

Prints a Markdown table, one row per mode (staged: each group of layers reading one input is
solved when the block's forward reaches it, the default; whole block: the block's layers are
solved together), with the 1-process and 2-process seconds and their ratio (median of the
repeats).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from loguru import logger
from torch.utils.data import DataLoader

from lightning_compress.bundled import TinyDecoder, TinyDecoderConfig
from lightning_compress.core.distributed import is_distributed
from lightning_compress.lightning.calibration import CalibrationModule
from lightning_compress.modifiers import GPTQModifier
from lightning_compress.modifiers.layerwise_modifier import LayerwiseModifier

VOCAB = 1024
W4_G128 = {"num_bits": 4, "strategy": "group", "group_size": 128}
COMPUTE_LAYERS = LayerwiseModifier.compute_layers
COMPUTE_STACK = LayerwiseModifier._compute_stack
SECONDS = {"compress": 0.0, "cpu": 0.0, "solve_cpu": 0.0}  # this process's, summed
SOLVES: list[float] = []  # this process's solve CPU time in each compute_layers call
CALLS: dict[str, float] = {}  # this process's solve CPU time per kind of layer
MEASURES = {
    "compress": "compress wall, rank 0",
    "cpu": "compress CPU, busiest rank",
    "solve_cpu": "solves CPU, busiest rank",
    "solve_path": "solves CPU, slowest rank per call",
    "total": "total wall",
}
TWIN_MEASURES = ("solve_cpu", "solve_path")


def timed_compute_layers(self: LayerwiseModifier, state: Any, names: list[str]) -> Any:
    if is_distributed():
        dist.barrier()  # leave out the wait for a rank still running its calibration forwards
    begin, cpu, solves = time.perf_counter(), time.process_time(), SECONDS["solve_cpu"]
    try:
        return COMPUTE_LAYERS(self, state, names)
    finally:
        SECONDS["compress"] += time.perf_counter() - begin
        SECONDS["cpu"] += time.process_time() - cpu
        SOLVES.append(SECONDS["solve_cpu"] - solves)


def timed_compute_stack(
    self: LayerwiseModifier, stack: list[str], statistics: Any, rows: Any = None
) -> Any:
    cpu = time.process_time()
    try:
        return COMPUTE_STACK(self, stack, statistics, rows)
    finally:
        seconds = time.process_time() - cpu
        SECONDS["solve_cpu"] += seconds
        kind = layer_kind(stack, rows)
        CALLS[kind] = CALLS.get(kind, 0.0) + seconds


def layer_kind(stack: list[str], rows: tuple[int, int] | None) -> str:
    """``stack`` without its block index (``self_attn.q_proj+k_proj+v_proj``; experts as
    ``mlp.experts.*.gate_proj+up_proj``), and its rows."""
    kinds: list[list[str]] = []
    for name in stack:
        parts = name.split(".")
        parts = parts[parts.index("layers") + 2 :] if "layers" in parts else parts
        if "experts" in parts:
            parts[parts.index("experts") + 1] = "*"
        if parts not in kinds:
            kinds.append(parts)
    kind = ".".join(kinds[0]) + "".join(f"+{parts[-1]}" for parts in kinds[1:])
    return kind if rows is None else f"{kind}[{rows[0]}:{rows[1]}]"


class Report(Callback):
    """Every rank writes its times; rank 0 the calibrated weights (at teardown: after the
    compression at the calibration's end, which a model of one block does all its work in)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        rank = trainer.global_rank
        times = {"seconds": SECONDS, "solves": SOLVES, "calls": CALLS}
        (self.directory / f"seconds{rank}.json").write_text(json.dumps(times))
        if rank == 0:
            torch.save(pl_module.model.state_dict(), self.directory / "weights.pt")


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """The random model to calibrate: the bundled decoder, or a Qwen3-MoE (``--experts``)."""
    torch.manual_seed(0)
    if args.experts == 0:
        config = TinyDecoderConfig(
            vocab_size=VOCAB,
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_layers=args.layers,
            num_heads=16,
            num_kv_heads=4,
            max_seq_len=args.seq,
        )
        return TinyDecoder(config).eval()
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe",
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        moe_intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=args.hidden // 16,
        num_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=args.seq,
        attn_implementation="eager",
    )
    return AutoModelForCausalLM.from_config(config).eval()


def run(args: argparse.Namespace, devices: int, staged: bool, directory: Path) -> dict:
    """One calibration: its times (see ``MEASURES``) and the path of its weights."""
    model = build_model(args)
    groups = {"w4": {"targets": ["Linear"], "weights": W4_G128}}
    recipe = GPTQModifier(config_groups=groups, ignore=["lm_head", "re:.*mlp.gate$"])
    module = CalibrationModule(
        model, recipe, staged=staged, progress=False, moe_calibrate_all_experts=not args.routed
    )
    generator = torch.Generator().manual_seed(1)
    data = torch.randint(0, VOCAB, (args.samples, args.seq), generator=generator)
    SECONDS.update(dict.fromkeys(SECONDS, 0.0))
    SOLVES.clear()
    CALLS.clear()
    trainer = Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_fork" if devices > 1 else "auto",
        inference_mode=False,
        callbacks=[Report(directory)],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    # the forked ranks must not walk the objects they inherit (the models of earlier repeats
    # among them) in a garbage collection: it paused a timed solve by about 0.3 s
    gc.collect()
    gc.freeze()
    begin = time.perf_counter()
    try:
        trainer.validate(module, dataloaders=DataLoader(data, batch_size=1), verbose=False)
    finally:
        gc.unfreeze()
    total = time.perf_counter() - begin
    paths = [directory / f"seconds{rank}.json" for rank in range(devices)]
    ranks = [json.loads(path.read_text()) for path in paths]
    seconds = [rank["seconds"] for rank in ranks]
    return {
        "compress": seconds[0]["compress"],
        "cpu": max(rank["cpu"] for rank in seconds),
        "solve_cpu": max(rank["solve_cpu"] for rank in seconds),
        "solve_path": sum(map(max, zip(*(rank["solves"] for rank in ranks), strict=True))),
        "total": total,
        "weights": directory / "weights.pt",
        "calls": [rank["calls"] for rank in ranks],
    }


def run_twins(args: argparse.Namespace, staged: bool, directory: Path) -> dict:
    """Two one-process calibrations started together, one per core: the slower twin's times."""
    context = multiprocessing.get_context("fork")
    twins = []
    for twin in range(2):
        path = directory / f"twin{twin}"
        path.mkdir()
        process = context.Process(target=run_twin, args=(args, staged, path, twin))
        process.start()
        twins.append((process, path))
    for process, _ in twins:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a twin calibration failed with exit code {process.exitcode}")
    ranks = [json.loads((path / "twin.json").read_text()) for _, path in twins]
    return {key: max(rank[key] for rank in ranks) for key in TWIN_MEASURES}


def run_twin(args: argparse.Namespace, staged: bool, directory: Path, core: int) -> None:
    """One twin: a one-process calibration pinned to ``core``; writes its times."""
    os.sched_setaffinity(0, {core % os.cpu_count()})
    times = run(args, 1, staged, directory)
    (directory / "twin.json").write_text(json.dumps({key: times[key] for key in TWIN_MEASURES}))


def print_twins(breakdowns: list[tuple[str, dict]], twins: dict[bool, list[dict]]) -> None:
    """The second table of ``--twin``: medians of the repeats."""
    print()
    columns = ["1 process alone", "1 process beside its twin", "2 processes", "2 / alone"]
    columns.append("2 / half the twin")
    for key in TWIN_MEASURES:
        print(f"| {MEASURES[key]} (s) | " + " | ".join(columns) + " |")
        print("|---" + "|---:" * len(columns) + "|")
        for (name, times), runs in zip(breakdowns, twins.values(), strict=True):
            alone, two = (statistics.median(t[key] for t in times[n]) for n in (1, 2))
            twin = statistics.median(run[key] for run in runs)
            cells = f"{alone:.2f} | {twin:.2f} | {two:.2f} | {two / alone:.2f} | "
            print(f"| {name} | {cells}{2 * two / twin:.2f} |")


def print_calls(name: str, times: dict[int, list[dict]]) -> None:
    """Each rank's solve CPU time per kind of layer, in the last repeat of each run."""
    for devices, runs in times.items():
        for rank, calls in enumerate(runs[-1]["calls"]):
            cells = ", ".join(f"{kind} {seconds:.2f}" for kind, seconds in calls.items())
            total = sum(calls.values())
            print(f"{name}, {devices} process(es), rank {rank} ({total:.2f} s): {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--staged", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--calls", action="store_true", help="solve CPU per kind of layer")
    parser.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE with this many")
    parser.add_argument("--routed", action="store_true", help="experts see their tokens only")
    parser.add_argument("--twin", action="store_true", help="also one process beside a copy")
    args = parser.parse_args()
    torch.set_num_threads(1)  # each DDP worker inherits it: one core per process
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    LayerwiseModifier.compute_layers = timed_compute_layers  # the forked workers inherit them
    LayerwiseModifier._compute_stack = timed_compute_stack
    modes = {"both": [True, False], "yes": [True], "no": [False]}[args.staged]
    columns = " | ".join(f"{what}, 1 / 2 (s) | ratio" for what in MEASURES.values())
    print(f"| mode | {columns} | same weights |")
    print("|---" + "|---:|---:" * len(MEASURES) + "|---|")
    breakdowns, twins = [], {}
    for staged in modes:
        times: dict[int, list[dict]] = {1: [], 2: []}
        same = True
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                for devices in (1, 2):
                    directory = Path(tmp) / str(devices)
                    directory.mkdir()
                    times[devices].append(run(args, devices, staged, directory))
                if args.twin:
                    twins.setdefault(staged, []).append(run_twins(args, staged, Path(tmp)))
                one = torch.load(times[1][-1]["weights"], weights_only=True)
                two = torch.load(times[2][-1]["weights"], weights_only=True)
                same &= one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        cells = []
        for key in MEASURES:
            one, two = (statistics.median(t[key] for t in times[n]) for n in (1, 2))
            cells.append(f"{one:.2f} / {two:.2f} | {two / one:.2f}")
        name = "staged (default)" if staged else "whole block"
        print(f"| {name} | {' | '.join(cells)} | {'yes' if same else 'NO'} |")
        breakdowns.append((name, times))
    if args.twin:
        print_twins(breakdowns, twins)
    if args.calls:
        for name, times in breakdowns:
            print_calls(name, times)


if __name__ == "__main__":
    main()
