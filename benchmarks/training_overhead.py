"""Step-time overhead of training-aware compression, beside torchao's QAT.

Part 1 (plain PyTorch loop, like torchao's own QAT measurements): a stack of 4 Linear(512, 512)
blocks, batch 8x256 tokens, SGD; plain step vs our modifiers driven through a
``CompressionSession`` vs torchao QAT (when ``torchao`` is installed).

Part 2 (Lightning): step time of ``Trainer.fit`` on the bundled decoder and on a transformers
Llama config, with no callback, ``Compressor()`` with an empty recipe, magnitude pruning and QAT.

    python benchmarks/training_overhead.py [--steps 30] [--threads 2]

Prints Markdown tables of the fastest step times (the estimate least disturbed by background
load; the plain-loop variants are measured in interleaved rounds) and their ratio to the plain
step.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from lightning.pytorch import Callback, Trainer
from loguru import logger
from torch import nn
from torch.utils.data import DataLoader

from lightning_compress import Compressor
from lightning_compress.core import CompressionSession, EventType
from lightning_compress.lightning.language_model import CausalLMModule
from lightning_compress.modifiers import MagnitudePruningModifier, Modifier, QuantizationModifier

W4A8_G32 = {
    "g": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "strategy": "group", "group_size": 32},
        "input_activations": {"num_bits": 8, "strategy": "token", "dynamic": True},
    }
}
TRAINING_EVENTS = (
    EventType.BATCH_START,
    EventType.LOSS_CALCULATED,
    EventType.OPTIM_PRE_STEP,
    EventType.OPTIM_POST_STEP,
    EventType.BATCH_END,
)


def ours(targets: tuple[str, ...] = ("Linear",)) -> dict[str, Callable[[], list[Modifier]]]:
    """Our training-aware recipes, built fresh for each run."""
    return {
        "empty recipe": lambda: [],
        "magnitude pruning 50%": lambda: [
            MagnitudePruningModifier(
                targets=list(targets), final_sparsity=0.5, start=0, end=10_000, update=10
            )
        ],
        "QAT W8A8": lambda: [QuantizationModifier(scheme="W8A8", targets=list(targets), start=0)],
        "QAT int8 act / int4 g32 weights": lambda: [
            QuantizationModifier(
                config_groups={"g": {**W4A8_G32["g"], "targets": list(targets)}}, start=0
            )
        ],
    }


def interleaved_min(steps: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Fastest time of each step function, measured in interleaved rounds.

    Interleaving spreads background load evenly over the variants, and the minimum is the
    estimate least disturbed by it.
    """
    for step in steps.values():  # warm-up
        step()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            begin = time.perf_counter()
            step()
            best[name] = min(best[name], time.perf_counter() - begin)
    return best


def linear_stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(512, 512) for _ in range(4)))


def plain_loop_step(model: nn.Module, session: CompressionSession | None) -> Callable[[], None]:
    """One SGD step on a fixed batch, emitting session events when a session is given."""
    x = torch.randn(8, 256, 512)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    if session is not None:
        session.initialize(optimizer=optimizer)

    def step() -> None:
        emit = session.event if session is not None else (lambda *a, **k: None)
        emit(TRAINING_EVENTS[0])
        loss = model(x).pow(2).mean()
        emit(TRAINING_EVENTS[1], loss=loss)
        loss.backward()
        emit(TRAINING_EVENTS[2])
        optimizer.step()
        emit(TRAINING_EVENTS[3])
        optimizer.zero_grad()
        emit(TRAINING_EVENTS[4])

    return step


def torchao_models() -> dict[str, nn.Module]:
    """torchao QAT-prepared stacks, or nothing when torchao is not installed."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        return {}
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    configs = {
        "torchao QAT W8A8": IntxFakeQuantizeConfig(torch.int8, "per_channel"),
        "torchao QAT int8 act / int4 g32 weights": IntxFakeQuantizeConfig(
            torch.int4, group_size=32
        ),
    }
    models = {}
    for name, weight in configs.items():
        model = linear_stack()
        quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
        models[name] = model
    return models


def plain_loop_table(rounds: int) -> list[tuple[str, float]]:
    steps = {"plain step": plain_loop_step(linear_stack(), None)}
    for name, build in ours().items():
        model = linear_stack()
        session = CompressionSession()
        session.initialize(recipe=build() or None, model=model)
        steps[f"ours: {name}"] = plain_loop_step(model, session)
    for name, model in torchao_models().items():
        steps[name] = plain_loop_step(model, None)
    return list(interleaved_min(steps, rounds).items())


class StepTimer(Callback):
    """Times from one ``on_train_batch_start`` to the next: the whole step, all hooks included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def fastest(self, warmup: int = 3) -> float:
        gaps = [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)][warmup:]
        return min(gaps)


def llama() -> nn.Module:
    """A transformers Llama (4 layers, hidden 512), or None when transformers is missing."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config)


def lightning_step(model_factory: Callable[[], nn.Module], modifiers, steps: int) -> float:
    timer = StepTimer()
    callbacks = [timer] if modifiers is None else [timer, Compressor(modifiers or None)]
    trainer = Trainer(
        accelerator="cpu",
        max_steps=steps + 4,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(torch.randint(0, 256, (8 * (steps + 4), 257)), batch_size=8)
    trainer.fit(CausalLMModule(model_factory()), data)
    return timer.fastest()


def lightning_table(name: str, factory: Callable[[], nn.Module] | None, steps: int, repeat: int):
    from lightning_compress.bundled import load_bundled_model

    factory = factory or load_bundled_model
    layers = (r"re:.*layers\.\d+\..*_proj$",)
    configs = {f"{name}: no callback": None}
    configs.update({f"{name}: Compressor, {label}": build for label, build in ours(layers).items()})
    best = dict.fromkeys(configs, float("inf"))
    for _ in range(repeat):  # whole runs interleaved, so slow phases of the machine spread evenly
        for label, build in configs.items():
            modifiers = None if build is None else build()
            best[label] = min(best[label], lightning_step(factory, modifiers, steps))
    return list(best.items())


def print_table(title: str, rows: list[tuple[str, float]]) -> None:
    base = rows[0][1]
    print(f"\n{title}\n\n| run | fastest step (ms) | vs plain |\n|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {1000 * seconds:.1f} | {seconds / base:.3f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (rounds) per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="interleaved Lightning runs")
    parser.add_argument(
        "--parts", default="plain,bundled,llama", help="comma-separated: plain, bundled, llama"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    parts = args.parts.split(",")
    if "plain" in parts:
        print_table("4 x Linear(512, 512), batch 8x256, SGD", plain_loop_table(args.steps))
    for part, title, factory in (
        ("bundled", "Lightning, bundled decoder, batch 8x256", None),
        ("llama", "Lightning, Llama 4x512, batch 8x256", llama),
    ):
        if part in parts:
            print_table(title, lightning_table(part, factory, args.steps, args.repeat))


if __name__ == "__main__":
    main()
