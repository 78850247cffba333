"""CheckpointSource: a model built empty from its directory, modules read in when needed."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lightning_compress.pipelines.checkpoint_source import CheckpointSource

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tie", [False, True])
def test_loaded_model_equals_from_pretrained(saved_llama, dtype, tie):
    directory = saved_llama(dtype, tie)
    source = CheckpointSource(directory)
    assert source.model.dtype == dtype
    assert all(p.is_meta for p in source.model.parameters())
    source.load(source.model)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory)
    tied = source.model.lm_head.weight is source.model.model.embed_tokens.weight
    assert tied == tie
    for (name, ours), (_, theirs) in zip(
        source.model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(ours, theirs), name
    tokens = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(source.model(tokens).logits, reference(tokens).logits)


def test_one_block_is_read_and_released_alone(saved_llama):
    source = CheckpointSource(saved_llama())
    block = source.model.model.layers[1]
    source.load(block)
    assert source.loaded(block)
    assert source.model.model.layers[0].mlp.up_proj.weight.is_meta
    assert source.model.model.embed_tokens.weight.is_meta
    stored = load_file(source.files.directory / "model.safetensors")
    assert torch.equal(block.mlp.up_proj.weight, stored["model.layers.1.mlp.up_proj.weight"])
    block.mlp.up_proj.register_buffer("weight_scale", torch.ones(3))
    source.release(block)
    assert all(t.is_meta for t in block.state_dict().values())
    assert not source.loaded(block)


def test_directory_without_config_or_weights_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"config\.json.*and no safetensors"):
        CheckpointSource(tmp_path)


def test_directory_without_safetensors_names_them(saved_llama):
    directory = saved_llama()
    (directory / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no safetensors weights"):
        CheckpointSource(directory)


def test_shards_that_do_not_match_the_config_name_the_tensors(saved_llama):
    directory = saved_llama()
    tensors = load_file(directory / "model.safetensors")
    del tensors["model.layers.2.mlp.down_proj.weight"]
    tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 128, dtype=torch.bfloat16)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        CheckpointSource(directory)
    message = str(error.value)
    assert "missing tensors ['model.layers.2.mlp.down_proj.weight']" in message
    assert "unexpected tensors ['model.extra.weight']" in message
    assert "model.layers.0.mlp.up_proj.weight (stored [5, 128], config [256, 128])" in message


def test_sharded_checkpoint_is_read_through_its_index(saved_llama, tmp_path):
    directory = saved_llama()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    source = CheckpointSource(sharded)
    source.load(source.model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(source.model.state_dict()[name], tensor), name


def test_unknown_model_type_is_named(saved_llama):
    directory = saved_llama()
    config = json.loads((directory / "config.json").read_text())
    config["model_type"] = "no_such_model"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling.NoSuchModel"}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        CheckpointSource(directory)
    assert "cannot build the config of model_type 'no_such_model'" in str(error.value)
    assert str(error.value).endswith("runs only with trust_remote_code=True")


def test_checkpoint_with_converted_names_is_refused(tmp_path):
    config = transformers.MixtralConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
    )
    directory = tmp_path / "mixtral"
    transformers.MixtralForCausalLM(config).save_pretrained(directory)
    with pytest.raises(ValueError, match=r"MixtralForCausalLM \(mixtral\) stores its weights"):
        CheckpointSource(directory)
    shutil.rmtree(directory)
