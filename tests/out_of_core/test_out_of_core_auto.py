"""oneshot(model=DIR) chooses between loading the checkpoint and reading it block by block
from the size of its weights and the memory available."""

from __future__ import annotations

import sys

import pytest
from out_of_core_runs import RECIPES, SETTINGS, assert_same_checkpoint, token_ids

from lightning_compress.core.checkpoint_files import CheckpointFiles
from lightning_compress.lightning import out_of_core_choice
from lightning_compress.lightning.oneshot import oneshot


def with_memory(monkeypatch, available: int | None) -> None:
    monkeypatch.setattr(out_of_core_choice, "available_memory", lambda: available)


def weights_of(directory) -> int:
    return CheckpointFiles(directory).nbytes


def test_the_stored_weights_size_is_read_from_the_headers(saved_llama):
    import transformers

    directory = saved_llama()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert weights_of(directory) == stored


def test_weights_above_half_the_memory_are_compressed_block_by_block(
    saved_llama, tmp_path, monkeypatch, messages
):
    directory = saved_llama()
    recipe = RECIPES["gptq"]
    with_memory(monkeypatch, 100 * weights_of(directory))
    fitting = oneshot(str(directory), recipe(), token_ids(), output_dir=tmp_path / "in", **SETTINGS)
    assert not any(tensor.is_meta for tensor in fitting.parameters())
    assert any("is loaded in memory" in message for message in messages)

    with_memory(monkeypatch, weights_of(directory) * 19 // 10)
    model = oneshot(str(directory), recipe(), token_ids(), output_dir=tmp_path / "out", **SETTINGS)
    assert all(tensor.is_meta for tensor in model.parameters())
    assert any("is compressed one block in memory at a time" in message for message in messages)
    assert_same_checkpoint(tmp_path / "in", tmp_path / "out")


def test_out_of_core_false_loads_a_model_too_large_for_the_memory(
    saved_llama, tmp_path, monkeypatch
):
    directory = saved_llama()
    with_memory(monkeypatch, 1)
    model = oneshot(
        str(directory),
        RECIPES["gptq"](),
        token_ids(),
        output_dir=tmp_path / "out",
        out_of_core=False,
        **SETTINGS,
    )
    assert not any(tensor.is_meta for tensor in model.parameters())
    assert (tmp_path / "out" / "config.json").is_file()


def test_without_output_dir_a_model_too_large_is_loaded_with_a_warning(
    saved_llama, monkeypatch, messages
):
    with_memory(monkeypatch, 1)
    model = oneshot(str(saved_llama()), RECIPES["gptq"](), token_ids(), **SETTINGS)
    assert not any(tensor.is_meta for tensor in model.parameters())
    assert any("may not fit" in m and "no output_dir is given" in m for m in messages)


def test_unknown_memory_loads_the_model(saved_llama, monkeypatch, messages):
    with_memory(monkeypatch, None)
    assert not out_of_core_choice.choose_out_of_core("auto", saved_llama())
    assert any("the available memory cannot be read" in message for message in messages)


def test_out_of_core_takes_true_false_or_auto(saved_llama, tmp_path):
    with pytest.raises(ValueError, match="out_of_core: expected True, False or 'auto', got 'yes'"):
        oneshot(str(saved_llama()), RECIPES["gptq"](), output_dir=tmp_path / "o", out_of_core="yes")


def test_available_memory_is_read_from_proc_meminfo(tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  4000 kB\nMemFree:  1000 kB\nMemAvailable:  3000 kB\n")
    monkeypatch.setattr(out_of_core_choice, "MEMINFO", meminfo)
    monkeypatch.setitem(sys.modules, "psutil", None)  # not installed
    assert out_of_core_choice.available_memory() == 3000 * 1024
    monkeypatch.setattr(out_of_core_choice, "MEMINFO", tmp_path / "absent")
    assert out_of_core_choice.available_memory() is None


def test_a_compressed_checkpoint_too_large_is_loaded_with_a_warning(
    saved_llama, tmp_path, monkeypatch, messages
):
    oneshot(str(saved_llama()), RECIPES["rtn"](), output_dir=tmp_path / "w4", out_of_core=False)
    with_memory(monkeypatch, 1)
    assert not out_of_core_choice.choose_out_of_core("auto", tmp_path / "w4")
    assert any("it is a compressed checkpoint" in message for message in messages)
