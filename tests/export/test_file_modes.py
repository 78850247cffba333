"""Checkpoint files get the permissions of any new file: ``0o666`` less the umask."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from lightning_compress.bundled import ByteTokenizer
from lightning_compress.export import save_compressed


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Sets the process umask to ``mask`` inside the block."""
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
@pytest.mark.parametrize("max_shard_bytes", [2**40, 20_000], ids=["one-shard", "sharded"])
def test_every_checkpoint_file_is_created_with_the_umask_mode(
    mask, max_shard_bytes, compressed, w4a16, tmp_path
):
    model = compressed("llama", "W4A16")
    with umask(mask):
        out = save_compressed(
            model,
            tmp_path / "checkpoint",
            tokenizer=ByteTokenizer(),
            recipe=w4a16(),
            max_shard_bytes=max_shard_bytes,
        )
    files = sorted(path for path in out.rglob("*") if path.is_file())
    shards = [path for path in files if path.suffix == ".safetensors"]
    assert (len(shards) > 1) == (max_shard_bytes < 2**40)
    assert {"config.json", "recipe.yaml", "tokenizer.json"} <= {path.name for path in files}
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in files}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]
