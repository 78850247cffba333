"""A checkpoint directory's config and safetensors shards are found, their headers read into
one description per tensor, and what is missing or inconsistent is named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lightning_compress.core.checkpoint_files import INDEX_NAME, CheckpointFiles

TENSORS = {
    "a.weight": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4),
    "b.weight": torch.ones(5, dtype=torch.float32),
    "c.index": torch.tensor([1, 2], dtype=torch.int64),
}


def _sharded(directory, shards: dict[str, list[str]], index: dict[str, str] | None = None):
    """Writes ``config.json``, the shards (file name to tensor names) and their index."""
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    weight_map = {}
    for file, names in shards.items():
        save_file({n: TENSORS[n] for n in names}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    (directory / INDEX_NAME).write_text(json.dumps({"weight_map": index or weight_map}))
    return directory


def test_shards_of_an_index_are_described_and_read_one_tensor_at_a_time(tmp_path):
    shards = {"one.safetensors": ["a.weight"], "two.safetensors": ["b.weight", "c.index"]}
    files = CheckpointFiles(_sharded(tmp_path, shards))
    assert {name: info.file for name, info in files.tensors.items()} == {
        "a.weight": "one.safetensors",
        "b.weight": "two.safetensors",
        "c.index": "two.safetensors",
    }
    assert files.tensors["a.weight"].shape == (3, 4)
    assert files.tensors["a.weight"].dtype == torch.bfloat16
    assert files.nbytes == 12 * 2 + 5 * 4 + 2 * 8
    assert files.floating_dtype() == torch.bfloat16
    assert files.config() == {"model_type": "llama"}
    for name, tensor in TENSORS.items():
        assert torch.equal(files.tensor(name), tensor)
    with pytest.raises(KeyError, match="no tensor 'd.weight'"):
        files.tensor("d.weight")


def test_missing_directory_config_and_weights_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is not a directory"):
        CheckpointFiles(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"no config\.json .* and no safetensors weights"):
        CheckpointFiles(tmp_path)


def test_an_index_naming_a_missing_shard_is_refused(tmp_path):
    directory = _sharded(tmp_path, {"one.safetensors": ["a.weight"]})
    (directory / "one.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"names shards .*\['one\.safetensors'\]"):
        CheckpointFiles(directory)


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_refused(tmp_path):
    shards = {"one.safetensors": ["a.weight"], "two.safetensors": ["b.weight"]}
    index = {"a.weight": "two.safetensors", "b.weight": "one.safetensors"}
    with pytest.raises(ValueError, match=r"places \['a\.weight', 'b\.weight'\] in shards"):
        CheckpointFiles(_sharded(tmp_path, shards, index))


def test_a_tensor_stored_twice_is_refused(tmp_path):
    directory = _sharded(tmp_path, {"one.safetensors": ["a.weight"]})
    (directory / INDEX_NAME).unlink()
    save_file({"a.weight": TENSORS["a.weight"]}, directory / "two.safetensors")
    with pytest.raises(ValueError, match="'a.weight' is stored twice"):
        CheckpointFiles(directory)


def test_an_index_that_is_not_json_with_a_weight_map_is_refused(tmp_path):
    directory = _sharded(tmp_path, {"one.safetensors": ["a.weight"]})
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="is not a safetensors index"):
        CheckpointFiles(directory)
