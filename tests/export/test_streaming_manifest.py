"""The manifest of a streaming checkpoint: the run's identity, how two differ, the source's
fingerprint."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lightning_compress.export import ExportError
from lightning_compress.export.manifest import (
    checkpoint_fingerprint,
    identity_differences,
    run_identity,
)

CONFIG = {"hidden_size": 64, "num_hidden_layers": 2}


def identity(recipe: str = "a: 1\nb: 2\n", config=CONFIG, inputs=None, shard: int = 1 << 30):
    return run_identity(recipe, config, inputs, {"max_shard_bytes": shard})


def test_equal_runs_have_no_differences():
    inputs = {"files": {"model.safetensors": {"bytes": 10}}}
    assert identity_differences(identity(inputs=inputs), identity(inputs=inputs)) == []


def test_each_difference_is_named_where_it_is():
    before = identity(inputs={"files": {"a.safetensors": {"bytes": 10}, "b.safetensors": {}}})
    after = identity(
        recipe="a: 1\nb: 3\n",
        config={**CONFIG, "hidden_size": 128},
        inputs={"files": {"a.safetensors": {"bytes": 12}, "c.safetensors": {}}},
        shard=1 << 20,
    )
    found = identity_differences(before, after, "a: 1\nb: 2\n", "a: 1\nb: 3\n")
    assert found == [
        "recipe: line 2 was 'b: 2', now 'b: 3'",
        "model_config.hidden_size: was 64, now 128",
        "inputs.files['a.safetensors'].bytes: was 10, now 12",
        "inputs.files['b.safetensors']: was {}, now missing",
        "inputs.files['c.safetensors']: was missing, now {}",
        f"options.max_shard_bytes: was {1 << 30}, now {1 << 20}",
    ]


def test_inputs_json_cannot_store_are_refused_naming_the_field():
    with pytest.raises(ValueError, match="inputs: expected JSON values"):
        run_identity(None, CONFIG, {"data": object()}, {})


def test_the_fingerprint_changes_with_a_shards_header_but_not_its_location(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.zeros(4)}, tmp_path / "model.safetensors")
    first = checkpoint_fingerprint(tmp_path)
    assert first["config"] == {"model_type": "llama"}
    assert checkpoint_fingerprint(tmp_path) == first

    save_file({"v": torch.zeros(4)}, tmp_path / "model.safetensors")  # same size, other name
    stat = (tmp_path / "model.safetensors").stat()
    os.utime(
        tmp_path / "model.safetensors",
        ns=(stat.st_atime_ns, first["files"]["model.safetensors"]["mtime_ns"]),
    )
    second = checkpoint_fingerprint(tmp_path)
    entry, before = second["files"]["model.safetensors"], first["files"]["model.safetensors"]
    assert entry["bytes"] == before["bytes"] and entry["mtime_ns"] == before["mtime_ns"]
    assert entry["header_sha256"] != before["header_sha256"]


def test_a_directory_without_config_or_with_a_truncated_shard_is_named(tmp_path):
    with pytest.raises(ExportError, match=r"cannot read config\.json"):
        checkpoint_fingerprint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ExportError, match=r"model\.safetensors' is truncated"):
        checkpoint_fingerprint(tmp_path)
