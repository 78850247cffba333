"""``model_free_compress`` writes what ``oneshot`` + ``save_compressed`` write for data-free
recipes, from the checkpoint directory alone, in one process or several; and refuses what it
cannot do, naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lightning_compress.export import ExportError, model_free_compress
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import GPTQModifier, QuantizationModifier
from lightning_compress.recipe import RecipeError

ARCHITECTURE = {
    "num_hidden_layers": 2,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "vocab_size": 128,
}
QUIET = {"enable_progress_bar": False, "logger": False}


def _save_llama(directory: Path, tied: bool = False) -> Path:
    torch.manual_seed(0)
    if tied:
        model = Qwen2ForCausalLM(Qwen2Config(**ARCHITECTURE, tie_word_embeddings=True))
    else:
        model = LlamaForCausalLM(LlamaConfig(**ARCHITECTURE))
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


def _recipe(scheme: str, ignore: tuple[str, ...] = ("lm_head",)) -> QuantizationModifier:
    return QuantizationModifier(scheme=scheme, targets=["Linear"], ignore=list(ignore))


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def _in_memory(source: Path, recipe: QuantizationModifier, output: Path) -> Path:
    model_class = Qwen2ForCausalLM if "qwen2" in (source / "config.json").read_text() else None
    model = (model_class or LlamaForCausalLM).from_pretrained(source, dtype=torch.bfloat16)
    oneshot(model, recipe, output_dir=output, trainer_kwargs=QUIET, progress=False)
    return output


def _assert_same_checkpoint(left: Path, right: Path) -> None:
    # Both paths run the same element-wise quantization code on the same bf16 weights, and
    # pack integer codes: the stored tensors are equal bit for bit.
    ours, theirs = _tensors(left), _tensors(right)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == theirs[name].dtype, name
        assert torch.equal(tensor.view(torch.uint8), theirs[name].view(torch.uint8)), name
    config = json.loads((left / "config.json").read_text())
    assert config == json.loads((right / "config.json").read_text())


@pytest.mark.parametrize(
    "scheme",
    [
        "W4A16",
        "W8A16",
        "W4A16_ASYM",
        "W8A8",
        "FP8_DYNAMIC",
        "FP8_BLOCK",
        "NVFP4A16",
        "MXFP4A16",
        "MXFP8A16",
    ],
)
def test_model_free_checkpoint_equals_oneshot_then_save_compressed(tmp_path, scheme):
    source = _save_llama(tmp_path / "source")
    ours = model_free_compress(source, _recipe(scheme), tmp_path / "ours", progress=False)
    theirs = _in_memory(source, _recipe(scheme), tmp_path / "theirs")
    _assert_same_checkpoint(ours, theirs)
    assert (ours / "recipe.yaml").is_file()
    assert not (ours / "model.safetensors.index.json").exists()  # one task, one file


def test_nvfp4_fused_layers_share_one_global_scale(tmp_path):
    source = _save_llama(tmp_path / "source")
    ours = _tensors(model_free_compress(source, _recipe("NVFP4A16"), tmp_path / "ours"))
    for fused in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
        parent, names = fused
        scales = {
            ours[f"model.layers.0.{parent}.{name}.weight_global_scale"].item() for name in names
        }
        assert len(scales) == 1, fused


def test_tied_lm_head_is_quantized_from_the_embedding_as_in_memory(tmp_path):
    source = _save_llama(tmp_path / "source", tied=True)
    recipe = _recipe("W8A16", ignore=())
    ours = model_free_compress(source, recipe, tmp_path / "ours", progress=False)
    theirs = _in_memory(source, _recipe("W8A16", ignore=()), tmp_path / "theirs")
    _assert_same_checkpoint(ours, theirs)
    assert "lm_head.weight_packed" in _tensors(ours) or "lm_head.weight" in _tensors(ours)


def test_two_workers_write_the_tensors_one_process_writes(tmp_path):
    source = _save_llama(tmp_path / "source")
    task_bytes = 200_000  # several tasks, each a few layers
    one = model_free_compress(
        source, _recipe("W4A16"), tmp_path / "one", task_bytes=task_bytes, progress=False
    )
    two = model_free_compress(
        source, _recipe("W4A16"), tmp_path / "two", workers=2, task_bytes=task_bytes
    )
    _assert_same_checkpoint(one, two)
    index = json.loads((two / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(two))
    assert len(set(index["weight_map"].values())) > 2


def test_output_loads_in_transformers_with_the_in_memory_logits(tmp_path):
    source = _save_llama(tmp_path / "source")
    ours = model_free_compress(source, _recipe("W4A16"), tmp_path / "ours", task_bytes=200_000)
    theirs = _in_memory(source, _recipe("W4A16"), tmp_path / "theirs")
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [
            LlamaForCausalLM.from_pretrained(path, dtype=torch.bfloat16)(ids).logits
            for path in (ours, theirs)
        ]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_missing_directory_config_and_weights_are_named(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        model_free_compress(tmp_path / "nowhere", _recipe("W4A16"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        model_free_compress(tmp_path / "empty", _recipe("W4A16"), tmp_path / "out")
    source = _save_llama(tmp_path / "source")
    (source / "model.safetensors").unlink()
    with pytest.raises(ExportError, match="no model.safetensors nor"):
        model_free_compress(source, _recipe("W4A16"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_shard_that_does_not_match_the_config_is_named(tmp_path):
    source = _save_llama(tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(8, 8, dtype=torch.bfloat16)
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*\[8, 8\]"):
        model_free_compress(source, _recipe("W4A16"), tmp_path / "out")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*not in"):
        model_free_compress(source, _recipe("W4A16"), tmp_path / "out")


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        (lambda: GPTQModifier(scheme="W4A16", targets=["Linear"]), "GPTQModifier"),
        (lambda: _recipe("FP8"), "needs calibration data"),
        (lambda: QuantizationModifier(scheme="W4A16", start=0), "start"),
    ],
    ids=["gptq", "static-activations", "qat"],
)
def test_recipes_that_need_data_or_training_are_refused_by_name(tmp_path, recipe, named):
    source = _save_llama(tmp_path / "source")
    with pytest.raises(RecipeError, match=named):
        model_free_compress(source, recipe(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_weight_that_is_not_finite_fails_the_run_and_leaves_no_output(tmp_path):
    source = _save_llama(tmp_path / "source")
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")
    save_file(tensors, source / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match=r"model\.layers\.1\.self_attn\.o_proj.*NaN"):
        model_free_compress(source, _recipe("W4A16"), tmp_path / "out", task_bytes=200_000)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["source"]


def test_a_model_whose_layers_are_rebuilt_in_memory_is_refused_by_module(tmp_path):
    config = GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128, n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ExportError, match=r"module 'transformer\.h\.0\.attn\.c_attn' \(Conv1D\)"):
        model_free_compress(tmp_path / "gpt2", _recipe("W8A16"), tmp_path / "out")


def test_workers_must_be_a_positive_int(tmp_path):
    with pytest.raises(ValueError, match="workers: expected a positive int, got 0"):
        model_free_compress(tmp_path, _recipe("W4A16"), tmp_path / "out", workers=0)
