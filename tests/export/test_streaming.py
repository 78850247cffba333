"""A checkpoint written block by block (``StreamingCheckpoint``) equals ``save_compressed``'s,
resumes after a kill, refuses another run, and survives a full disk."""

from __future__ import annotations

import errno
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from export_models import SCHEMES, compressed
from moe_models import tiny_moe, tokens
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM

from lightning_compress.export import ExportError, check_output_dir, save_compressed, streaming
from lightning_compress.export.manifest import MANIFEST_NAME, checkpoint_fingerprint
from lightning_compress.export.staging import recover_checkpoint
from lightning_compress.export.streaming import WORK_SUFFIX, StreamingCheckpoint
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers.pruning import MASK_BUFFER
from lightning_compress.pipelines.cache import ActivationCache
from lightning_compress.pipelines.capture import BlockInputs
from lightning_compress.recipe import Recipe

METADATA = ("config.json", "sparsity.json", "recipe.yaml", "generation_config.json")


def recipe_of(scheme: str) -> str:
    return Recipe.create_instance([SCHEMES[scheme]()]).yaml()


def bfloat16_mixtral() -> nn.Module:
    """A tiny bfloat16 Mixtral (experts saved per expert as w1/w3/w2), FP8-quantized."""
    model = tiny_moe("mixtral", dtype=torch.bfloat16)
    oneshot(model, SCHEMES["FP8"](), tokens(4, 16), num_calibration_samples=4, progress=False)
    return model


CASES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "llama-2:4+W4A16": (lambda: compressed("llama", "2:4+W4A16"), "2:4+W4A16"),
    "qwen2-tied-W8A8": (lambda: compressed("qwen2", "W8A8"), "W8A8"),
    "mixtral-bf16-FP8": (bfloat16_mixtral, "FP8"),
}


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory) -> tuple[Callable[[], nn.Module], str, Path]:
    """How to build a compressed tiny model, its scheme, and its ``save_compressed``
    checkpoint."""
    build, scheme = CASES[request.param]
    path = tmp_path_factory.mktemp("saved") / "saved"
    save_compressed(build(), path, recipe=recipe_of(scheme), progress=False)
    return build, scheme, path


def parts(model: nn.Module) -> list[list[str]]:
    """The embeddings, each decoder block, and the norm with the head."""
    blocks = [[f"model.layers.{i}"] for i in range(len(model.model.layers))]
    return [["model.embed_tokens"], *blocks, ["model.norm", "lm_head"]]


def write(checkpoint: StreamingCheckpoint, model: nn.Module, todo: list[list[str]]) -> None:
    """Writes each part, then frees its modules (back on the meta device)."""
    for names in todo:
        checkpoint.write_modules(model, names)
        for name in names:
            model.get_submodule(name).to("meta")


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as opened:
            tensors.update({key: opened.get_tensor(key) for key in opened.keys()})  # noqa: SIM118
    return tensors


def assert_same_checkpoint(streamed: Path, saved: Path) -> None:
    expected, got = tensors_of(saved), tensors_of(streamed)
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key
    for name in METADATA:
        assert (streamed / name).exists() == (saved / name).exists(), name
        if (saved / name).exists():
            assert (streamed / name).read_text() == (saved / name).read_text(), name
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(got)
    for key, file in index["weight_map"].items():
        with safe_open(streamed / file, "pt") as opened:
            assert key in opened.keys(), key  # noqa: SIM118


def test_a_model_written_block_by_block_equals_save_compressed_and_loads(saved, tmp_path):
    build, scheme, expected = saved
    model = build()
    output = tmp_path / "streamed"
    with StreamingCheckpoint.open(
        output, model, recipe=recipe_of(scheme), max_shard_bytes=40_000
    ) as checkpoint:
        write(checkpoint, model, parts(model))
        assert not output.exists()  # nothing looks complete before the end
        checkpoint.finish(model)

    assert_same_checkpoint(output, expected)
    assert not (tmp_path / f".streamed{WORK_SUFFIX}").exists()
    ids = tokens(2, 12)  # within every case's vocabulary
    with torch.no_grad():
        streamed_logits = AutoModelForCausalLM.from_pretrained(output)(ids).logits
        saved_logits = AutoModelForCausalLM.from_pretrained(expected)(ids).logits
    torch.testing.assert_close(streamed_logits, saved_logits)


def test_a_killed_run_reopened_reports_its_finished_parts_and_finishes_equal(saved, tmp_path):
    build, scheme, expected = saved
    model = build()
    output = tmp_path / "streamed"
    todo = parts(model)
    first = StreamingCheckpoint.open(output, model, recipe=recipe_of(scheme))
    write(first, model, todo[:2])
    first.close()  # killed: no finish
    work = tmp_path / f".streamed{WORK_SUFFIX}"
    # a part being written when the process died: files the manifest does not record
    (work / "part-00002-00001.safetensors").write_bytes(b"half")
    recover_checkpoint(output)  # what any save or load of the target runs first
    check_output_dir(output, overwrite=False)
    assert not output.exists()

    model = build()
    with StreamingCheckpoint.open(output, model, recipe=recipe_of(scheme)) as checkpoint:
        assert checkpoint.finished == todo[:2]
        assert checkpoint.is_finished(todo[1]) and not checkpoint.is_finished(todo[2])
        block = checkpoint.parts[1]
        assert block.modules == todo[1] and "model.layers.0.self_attn.o_proj" in block.linears
        assert not (work / "part-00002-00001.safetensors").exists()
        with pytest.raises(ExportError, match="already written"):
            checkpoint.write_modules(model, todo[1])
        write(checkpoint, model, todo[2:])
        checkpoint.finish(model)
    assert_same_checkpoint(output, expected)


def test_a_part_whose_file_is_gone_is_written_again(tmp_path):
    model = compressed("llama", "W4A16")
    output = tmp_path / "streamed"
    with StreamingCheckpoint.open(output, model) as checkpoint:
        write(checkpoint, model, parts(model)[:3])
    work = tmp_path / f".streamed{WORK_SUFFIX}"
    next(work.glob("part-00001-*")).unlink()
    with StreamingCheckpoint.open(output, compressed("llama", "W4A16")) as checkpoint:
        assert checkpoint.finished == parts(model)[:1]
    assert not list(work.glob("part-00002-*"))


def test_resuming_with_another_recipe_is_refused_naming_the_line(tmp_path):
    model = compressed("llama", "W4A16")
    output = tmp_path / "streamed"
    with StreamingCheckpoint.open(output, model, recipe=recipe_of("W4A16")) as checkpoint:
        write(checkpoint, model, parts(model)[:1])
    other = recipe_of("W4A16").replace("- lm_head", "- model.layers.0.mlp.down_proj")
    with pytest.raises(ExportError, match=r"recipe: line 5 was '- lm_head', now") as raised:
        StreamingCheckpoint.open(output, compressed("llama", "W4A16"), recipe=other)
    assert str(tmp_path / f".streamed{WORK_SUFFIX}") in str(raised.value)


def test_resuming_another_model_is_refused_naming_the_config_key(tmp_path):
    output = tmp_path / "streamed"
    StreamingCheckpoint.open(output, compressed("llama", "W4A16")).close()
    model = compressed("llama", "W4A16")
    model.config.rms_norm_eps = 1e-3
    with pytest.raises(ExportError, match=r"model_config\.rms_norm_eps: was 1e-06, now 0\.001"):
        StreamingCheckpoint.open(output, model)


def write_source(directory: Path, values: torch.Tensor) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": values}, directory / "model.safetensors")


def test_resuming_from_a_changed_source_shard_is_refused_naming_the_file(tmp_path):
    model = compressed("llama", "W4A16")
    source, output = tmp_path / "source", tmp_path / "streamed"
    write_source(source, torch.zeros(4))
    fingerprint = {"model": checkpoint_fingerprint(source)}
    StreamingCheckpoint.open(output, model, inputs=fingerprint).close()
    StreamingCheckpoint.open(output, model, inputs=fingerprint).close()  # same run: resumes

    write_source(source, torch.zeros(6))
    changed = {"model": checkpoint_fingerprint(source)}
    with pytest.raises(ExportError, match=r"inputs\.model\.files\['model\.safetensors'\]\.bytes"):
        StreamingCheckpoint.open(output, model, inputs=changed)


def test_a_second_process_cannot_open_a_run_in_progress(tmp_path):
    model = compressed("llama", "W4A16")
    running = StreamingCheckpoint.open(tmp_path / "out", model)
    with pytest.raises(ExportError, match="another process is writing"):
        StreamingCheckpoint.open(tmp_path / "out", model)
    running.close()
    StreamingCheckpoint.open(tmp_path / "out", model).close()


def disk_full_in_save_file(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def disk_full_in_safetensors(*args, **kwargs):
    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize("failure", [disk_full_in_save_file, disk_full_in_safetensors])
def test_a_full_disk_names_the_directory_and_keeps_the_finished_parts(
    failure, monkeypatch, tmp_path
):
    model = compressed("llama", "W4A16")
    output = tmp_path / "streamed"
    todo = parts(model)
    with StreamingCheckpoint.open(output, model) as checkpoint:
        write(checkpoint, model, todo[:2])
        monkeypatch.setattr(streaming, "save_file", failure)
        with pytest.raises(ExportError) as raised:
            checkpoint.write_modules(model, todo[2])
        message = str(raised.value)
        assert "disk is full" in message and str(output) in message and "free" in message
        assert "['model.layers.0']" in message  # the last finished part
        assert checkpoint.finished == todo[:2]
    work = tmp_path / f".streamed{WORK_SUFFIX}"
    assert not list(work.glob("part-00002-*"))
    assert not output.exists()
    manifest = json.loads((work / MANIFEST_NAME).read_text())
    assert [part["modules"] for part in manifest["parts"]] == todo[:2]


def test_a_full_disk_while_flushing_a_part_keeps_it_unrecorded(monkeypatch, tmp_path):
    model = compressed("llama", "W4A16")
    output = tmp_path / "streamed"
    with StreamingCheckpoint.open(output, model) as checkpoint:

        def full(path: Path) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(streaming, "fsync_path", full)
        with pytest.raises(ExportError, match="disk is full"):
            checkpoint.write_modules(model, "model.embed_tokens")
        assert checkpoint.finished == []
    assert not list((tmp_path / f".streamed{WORK_SUFFIX}").glob("part-*"))


def test_writing_a_module_on_the_meta_device_is_refused_naming_it(tmp_path):
    model = compressed("llama", "W4A16")
    model.model.layers[1].to("meta")
    with StreamingCheckpoint.open(tmp_path / "out", model) as checkpoint:
        with pytest.raises(ExportError, match=r"meta device.*model\.layers\.1\."):
            checkpoint.write_modules(model, "model.layers.1")
        with pytest.raises(ValueError, match="no submodule 'model.layers.7'"):
            checkpoint.write_modules(model, "model.layers.7")


def test_finishing_with_modules_unwritten_is_refused_naming_them(tmp_path):
    model = compressed("llama", "W4A16")
    output = tmp_path / "out"
    with StreamingCheckpoint.open(output, model) as checkpoint:
        write(checkpoint, model, parts(model)[:-1])
        with pytest.raises(ExportError, match=r"in no written part.*model\.norm\.weight"):
            checkpoint.finish(model)
    assert not output.exists()


def block_inputs(seed: int) -> BlockInputs:
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 5, 8, generator=generator, dtype=torch.bfloat16)
    return BlockInputs((hidden,), {"position_ids": torch.arange(5)[None], "use_cache": False})


def test_saved_block_inputs_come_back_bit_identical_after_a_restart(tmp_path):
    model = compressed("llama", "W4A16")
    output = tmp_path / "out"
    cache = ActivationCache()
    for seed in range(3):
        cache.append(block_inputs(seed))
    with StreamingCheckpoint.open(output, model) as checkpoint:
        write(checkpoint, model, parts(model)[:2])
        checkpoint.save_activations(1, cache)
        moved = ActivationCache()
        for seed in range(3, 6):
            moved.append(block_inputs(seed))
        checkpoint.save_activations(2, moved)
    work = tmp_path / f".out{WORK_SUFFIX}"
    assert [entry.name for entry in work.glob("activations-*")] == ["activations-00002"]

    with StreamingCheckpoint.open(output, compressed("llama", "W4A16")) as checkpoint:
        restored = ActivationCache()
        assert checkpoint.load_activations(restored) == 2
    assert len(restored) == 3
    for batch in range(3):
        got, expected = restored.inputs(batch), moved.inputs(batch)
        assert got.hidden_states.dtype == torch.bfloat16
        assert torch.equal(got.hidden_states, expected.hidden_states)
        assert torch.equal(got.kwargs["position_ids"], expected.kwargs["position_ids"])
        assert got.kwargs["use_cache"] is False


def test_a_full_disk_while_saving_block_inputs_keeps_the_previous_ones(monkeypatch, tmp_path):
    model = compressed("llama", "W4A16")
    earlier, later = ActivationCache(), ActivationCache()
    earlier.append(block_inputs(0))
    later.append(block_inputs(1))
    with StreamingCheckpoint.open(tmp_path / "out", model) as checkpoint:
        checkpoint.save_activations(1, earlier)

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(torch, "save", full)
        with pytest.raises(ExportError, match=r"disk is full writing the inputs of block 2"):
            checkpoint.save_activations(2, later)
        monkeypatch.undo()
        restored = ActivationCache()
        assert checkpoint.load_activations(restored) == 1
    assert torch.equal(restored.inputs(0).hidden_states, earlier.inputs(0).hidden_states)
    work = tmp_path / f".out{WORK_SUFFIX}"
    assert sorted(entry.name for entry in work.glob("activations-*")) == ["activations-00001"]


def test_a_full_disk_while_finishing_publishes_nothing_and_finishing_again_works(
    monkeypatch, tmp_path
):
    model = compressed("llama", "W4A16")
    output = tmp_path / "out"
    with StreamingCheckpoint.open(output, model) as checkpoint:
        write(checkpoint, model, parts(model))

        def no_links(*args):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(streaming.os, "link", no_links)
        monkeypatch.setattr(streaming.shutil, "copyfile", full)
        with pytest.raises(ExportError, match="disk is full writing the finished checkpoint"):
            checkpoint.finish(model)
        assert not output.exists()
        assert [entry.name for entry in tmp_path.iterdir()] == [f".out{WORK_SUFFIX}"]
        monkeypatch.undo()
        checkpoint.finish(model)
    assert (output / "config.json").exists()
    assert not (tmp_path / f".out{WORK_SUFFIX}").exists()


def test_writing_a_block_whose_pruning_is_unfinished_is_refused_naming_the_layer(tmp_path):
    model = compressed("llama", "W4A16")
    layer = model.model.layers[1].mlp.down_proj
    layer.register_buffer(MASK_BUFFER, torch.ones_like(layer.weight, dtype=torch.bool))
    with StreamingCheckpoint.open(tmp_path / "out", model) as checkpoint:
        checkpoint.write_modules(model, "model.layers.0")
        with pytest.raises(ExportError, match=r"layer 'model\.layers\.1\.mlp\.down_proj' still"):
            checkpoint.write_modules(model, "model.layers.1")
        assert checkpoint.finished == [["model.layers.0"]]


def test_a_run_killed_after_publishing_leaves_no_work_directory_behind(monkeypatch, tmp_path):
    model = compressed("llama", "W4A16")
    output = tmp_path / "out"
    with StreamingCheckpoint.open(output, model) as checkpoint:
        write(checkpoint, model, parts(model))

        def killed(work: Path) -> None:
            raise KeyboardInterrupt

        monkeypatch.setattr(streaming, "_remove_work", killed)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.finish(model)
    monkeypatch.undo()
    assert (output / "config.json").exists() and (tmp_path / f".out{WORK_SUFFIX}").exists()

    with pytest.raises(ExportError, match="exists and is not empty"):  # as after any save
        StreamingCheckpoint.open(output, compressed("llama", "W4A16"))
    assert [entry.name for entry in tmp_path.iterdir()] == ["out"]
    assert (output / "config.json").exists()
