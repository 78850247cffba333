"""Train the bundled TinyDecoder from scratch on Jane Austen's novels.

Trains on the first 90% of every ``*.txt`` file in ``--data-dir`` (byte tokens), reports
perplexity on the held-out last 10% of *Persuasion* and writes ``tiny_decoder.safetensors``
(float16) and ``tiny_decoder.json`` into ``--output-dir``.

Usage:
    python scripts/train_bundled_model.py [--steps N] [--batch-size B] [--lr LR]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lightning_compress.bundled import (
    ByteTokenizer,
    TinyDecoder,
    TinyDecoderConfig,
    bundled_text,
    perplexity,
    split_text,
    token_windows,
)
from lightning_compress.bundled.loading import CHECKPOINT_NAME, CONFIG_NAME, DATA_DIR


def parse_args() -> argparse.Namespace:
    """Parse command-line arguments.

    Returns:
        The parsed arguments.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/work/shared/data/austen"))
    parser.add_argument("--output-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--steps", type=int, default=1100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_training_tokens(data_dir: Path, tokenizer: ByteTokenizer) -> torch.Tensor:
    """Tokenize the first 90% of every novel in ``data_dir``.

    Args:
        data_dir: Folder of ``*.txt`` files, read in file-name order.
        tokenizer: Tokenizer to encode with.

    Returns:
        1-D LongTensor of byte tokens.

    Raises:
        FileNotFoundError: If ``data_dir`` holds no ``*.txt`` file.
    """
    paths = sorted(data_dir.glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"No *.txt files in {data_dir}")
    heads = [split_text(p.read_text(encoding="utf-8"))[0] for p in paths]
    print(f"training on {len(paths)} files: {', '.join(p.name for p in paths)}")
    return torch.tensor(tokenizer.encode("\n".join(heads)), dtype=torch.long)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warmup followed by cosine decay to ``min_ratio`` of the peak.

    Args:
        step: Current optimizer step (0-based).
        warmup_steps: Steps of linear warmup.
        total_steps: Total optimizer steps.
        min_ratio: Final learning rate as a fraction of the peak.

    Returns:
        Multiplier of the peak learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def main() -> None:
    """Train, save and evaluate the bundled model."""
    args = parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    tokenizer = ByteTokenizer()
    config = TinyDecoderConfig()
    tokens = load_training_tokens(args.data_dir, tokenizer)
    seq_len = config.max_seq_len
    print(f"{tokens.numel():,} training tokens")

    model = TinyDecoder(config)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, args.warmup_steps, args.steps, args.min_lr_ratio),
    )

    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(1, args.steps + 1):
        offsets = torch.randint(
            0, tokens.numel() - seq_len - 1, (args.batch_size,), generator=generator
        )
        batch = torch.stack([tokens[o : o + seq_len + 1] for o in offsets.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        if step % args.log_every == 0 or step == args.steps:
            count = (step - 1) % args.log_every + 1
            print(
                f"step {step:5d}  loss {running / count:.4f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s",
                flush=True,
            )
            running = 0.0
    print(f"training took {time.perf_counter() - start:.0f}s")

    args.output_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = args.output_dir / CHECKPOINT_NAME
    state = {
        name: t.detach().to(torch.float16).contiguous() for name, t in model.state_dict().items()
    }
    save_file(state, checkpoint)
    (args.output_dir / CONFIG_NAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    print(f"wrote {checkpoint} ({checkpoint.stat().st_size / 1e6:.2f} MB)")

    # Score the float16 weights exactly as they were saved.
    model.load_state_dict(load_file(checkpoint), strict=True)
    windows = token_windows(bundled_text("evaluation"), tokenizer, seq_len)
    ppl = perplexity(model, windows)
    print(f"held-out perplexity ({windows.shape[0]} windows of {seq_len} bytes): {ppl:.3f}")


if __name__ == "__main__":
    main()
