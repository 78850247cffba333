"""Write a synthetic Llama checkpoint of any size without holding it in memory.

The checkpoint is what ``LlamaForCausalLM.save_pretrained`` writes (``config.json``,
``generation_config.json``, bf16 safetensors shards and their index), with random weights
(normal, std 0.02; norms of ones) drawn chunk by chunk straight into the files, so memory stays
about one chunk whatever the model's size. The tokenizer is SmolLM2-135M's (its vocabulary
of 49152 sets the embedding size), copied from the benchmark cache that
``benchmarks/smollm2_model.py prepare`` fills.

Usage::

    python benchmarks/synthetic_checkpoint.py OUT_DIR --hidden 4096 --intermediate 11008 \\
        --blocks 64

Weights are reproducible: each tensor's values depend only on ``--seed`` and its name.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import zlib
from pathlib import Path

import torch

from lightning_compress.export.writer import plan_shards

TOKENIZER_DIR = Path.home() / ".cache" / "lightning-compress" / "smollm2-135m"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB = 49152
HEAD_DIM = 128
CHUNK_ELEMENTS = 2**24
MAX_SHARD_BYTES = 5 * 2**30


def llama_config(hidden: int, intermediate: int, blocks: int, kv_heads: int | None) -> dict:
    """The ``config.json`` of the synthetic Llama.

    Args:
        hidden: the hidden size (a multiple of 128, the head size).
        intermediate: the MLP's size.
        blocks: the number of decoder blocks.
        kv_heads: key/value heads; None: as many as query heads.

    Returns:
        The config as transformers writes it.
    """
    heads = hidden // HEAD_DIM
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": blocks,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads or heads,
        "head_dim": HEAD_DIM,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "dtype": "bfloat16",
    }


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its shape, in the order transformers saves them.

    Args:
        config: the model's config.

    Returns:
        Tensor name to shape.
    """
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_out = config["num_attention_heads"] * HEAD_DIM
    kv_out = config["num_key_value_heads"] * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, hidden)}
    for index in range(config["num_hidden_layers"]):
        block = f"model.layers.{index}"
        shapes |= {
            f"{block}.input_layernorm.weight": (hidden,),
            f"{block}.self_attn.q_proj.weight": (q_out, hidden),
            f"{block}.self_attn.k_proj.weight": (kv_out, hidden),
            f"{block}.self_attn.v_proj.weight": (kv_out, hidden),
            f"{block}.self_attn.o_proj.weight": (hidden, q_out),
            f"{block}.post_attention_layernorm.weight": (hidden,),
            f"{block}.mlp.gate_proj.weight": (inter, hidden),
            f"{block}.mlp.up_proj.weight": (inter, hidden),
            f"{block}.mlp.down_proj.weight": (hidden, inter),
        }
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (VOCAB, hidden)
    return shapes


def write_checkpoint(
    directory: Path,
    hidden: int,
    intermediate: int,
    blocks: int,
    kv_heads: int | None = None,
    seed: int = 0,
) -> int:
    """Writes the synthetic checkpoint into ``directory`` (created; must not exist).

    Args:
        directory: where to write.
        hidden: the hidden size.
        intermediate: the MLP's size.
        blocks: the number of decoder blocks.
        kv_heads: key/value heads; None: as many as query heads.
        seed: the seed of the random weights.

    Returns:
        The bytes of weights written.
    """
    directory.mkdir(parents=True)
    config = llama_config(hidden, intermediate, blocks, kv_heads)
    shapes = tensor_shapes(config)
    meta = {
        key: torch.empty(shape, dtype=torch.bfloat16, device="meta")
        for key, shape in shapes.items()
    }
    shards = plan_shards(meta, MAX_SHARD_BYTES)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, keys in zip(names, shards, strict=True):
        _write_shard(directory / name, {key: shapes[key] for key in keys}, seed)
        weight_map |= dict.fromkeys(keys, name)
    total = sum(2 * torch.Size(shape).numel() for shape in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _copy_tokenizer(directory)
    return total


def _write_shard(path: Path, shapes: dict[str, tuple[int, ...]], seed: int) -> None:
    """A safetensors file written tensor by tensor, each in chunks of rows."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key, shape in shapes.items():
        nbytes = 2 * torch.Size(shape).numel()
        header[key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(text)))
        file.write(text)
        for key, shape in shapes.items():
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
            numel = torch.Size(shape).numel()
            for start in range(0, numel, CHUNK_ELEMENTS):
                count = min(CHUNK_ELEMENTS, numel - start)
                if len(shape) == 1:
                    chunk = torch.ones(count, dtype=torch.bfloat16)
                else:
                    chunk = (torch.randn(count, generator=generator) * 0.02).to(torch.bfloat16)
                file.write(chunk.view(torch.int16).numpy().tobytes())


def _copy_tokenizer(directory: Path) -> None:
    if not (TOKENIZER_DIR / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"no SmolLM2 tokenizer in {TOKENIZER_DIR}; run "
            "`python benchmarks/smollm2_model.py prepare` first"
        )
    for name in TOKENIZER_FILES:
        if (TOKENIZER_DIR / name).is_file():
            shutil.copyfile(TOKENIZER_DIR / name, directory / name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--kv_heads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    total = write_checkpoint(
        args.output_dir, args.hidden, args.intermediate, args.blocks, args.kv_heads, args.seed
    )
    print(f"wrote {total / 1e9:.2f} GB of bf16 weights to {args.output_dir}")


if __name__ == "__main__":
    main()
