"""oneshot(model=DIR, out_of_core=True): one block in memory at a time, the same checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from out_of_core_runs import RECIPES, SETTINGS, assert_same_checkpoint, token_ids
from torch import nn

from lightning_compress.core import Event, State
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import Modifier
from lightning_compress.pipelines.checkpoint_source import CheckpointSource


def _in_memory_and_out_of_core(
    directory: Path, recipe: Callable[[], list[Modifier]], tmp_path: Path, **options: object
) -> nn.Module:
    """Compresses ``directory`` with ``recipe`` in memory (to ``tmp_path/in``) and out of core
    with ``options`` (to ``tmp_path/out``), checks both wrote the same checkpoint, and returns
    the out-of-core run's model."""
    oneshot(str(directory), recipe(), token_ids(), output_dir=tmp_path / "in", **SETTINGS)
    model = oneshot(
        str(directory),
        recipe(),
        token_ids(),
        output_dir=tmp_path / "out",
        out_of_core=True,
        **options,
        **SETTINGS,
    )
    assert_same_checkpoint(tmp_path / "in", tmp_path / "out")
    return model


@pytest.mark.parametrize(
    ("recipe", "dtype"),
    [
        ("gptq", torch.bfloat16),
        ("gptq", torch.float32),
        ("sparsegpt", torch.bfloat16),
        ("awq_rtn", torch.bfloat16),
        ("sparsegpt_then_gptq", torch.bfloat16),
    ],
)
def test_out_of_core_checkpoint_equals_the_in_memory_one(saved_llama, tmp_path, recipe, dtype):
    model = _in_memory_and_out_of_core(saved_llama(dtype), RECIPES[recipe], tmp_path)
    assert all(tensor.is_meta for tensor in model.parameters())
    with pytest.raises(RuntimeError, match=r"weights are not in memory but in .*out"):
        model(token_ids())


def test_tied_embeddings_are_read_once_and_saved_as_in_memory(saved_llama, tmp_path):
    _in_memory_and_out_of_core(saved_llama(tie=True), RECIPES["gptq"], tmp_path)


def test_activations_spilled_to_disk_give_the_same_checkpoint(saved_llama, tmp_path):
    spill = tmp_path / "spill"
    _in_memory_and_out_of_core(saved_llama(), RECIPES["gptq"], tmp_path, offload_dir=spill)
    assert not any(spill.iterdir())


def test_out_of_core_needs_an_output_dir_and_a_directory(saved_llama, tmp_path):
    with pytest.raises(ValueError, match="out_of_core: needs output_dir"):
        oneshot(str(saved_llama()), RECIPES["gptq"](), token_ids(), out_of_core=True, **SETTINGS)
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="pass the directory as model, not a Linear"):
        oneshot(module, RECIPES["gptq"](), out_of_core=True, output_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="precision='float16': out_of_core keeps"):
        oneshot(
            str(saved_llama()),
            RECIPES["gptq"](),
            out_of_core=True,
            output_dir=tmp_path / "o",
            precision="float16",
        )


def test_a_data_free_recipe_is_compressed_block_by_block_as_in_memory(saved_llama, tmp_path):
    directory = saved_llama()
    recipe = RECIPES["rtn"]
    oneshot(str(directory), recipe(), output_dir=tmp_path / "in", progress=False)
    oneshot(str(directory), recipe(), output_dir=tmp_path / "out", out_of_core=True, progress=False)
    assert_same_checkpoint(tmp_path / "in", tmp_path / "out")


class ScalesAtTheEnd(Modifier):
    """Changes every block's weights when the calibration ends, after they were written."""

    def on_calibration_end(self, state: State, event: Event) -> None:
        with torch.no_grad():
            for name, module in state.model.named_modules():
                if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
                    module.weight.mul_(2)


def test_a_recipe_changing_written_blocks_is_refused_and_nothing_published(saved_llama, tmp_path):
    recipe = [*RECIPES["gptq"](), ScalesAtTheEnd()]
    with pytest.raises(RuntimeError, match=r"changed blocks \['model.layers.0', "):
        oneshot(
            str(saved_llama()),
            recipe,
            token_ids(),
            output_dir=tmp_path / "out",
            out_of_core=True,
            **SETTINGS,
        )
    assert not (tmp_path / "out").exists()


def test_one_block_is_in_memory_at_a_time(saved_llama, tmp_path, monkeypatch):
    """While a block is read, nothing else is in memory; the modules outside the blocks are
    read to capture the inputs and again after the last block."""
    modules = ["model.embed_tokens", "model.norm", "lm_head"]
    modules += [f"model.layers.{index}" for index in range(3)]
    loads: list[tuple[str, list[str]]] = []
    load = CheckpointSource.load

    def recording(self, module):
        load(self, module)
        present = [name for name in modules if self.loaded(self.model.get_submodule(name))]
        loads.append((self.name_of(module), present))

    monkeypatch.setattr(CheckpointSource, "load", recording)
    oneshot(
        str(saved_llama()),
        RECIPES["gptq"](),
        token_ids(),
        output_dir=tmp_path / "out",
        out_of_core=True,
        **SETTINGS,
    )
    blocks = [(name, present) for name, present in loads if name.startswith("model.layers.")]
    assert blocks == [(name, [name]) for name in modules[3:]]
    assert [name for name, _ in loads].count("lm_head") == 2
