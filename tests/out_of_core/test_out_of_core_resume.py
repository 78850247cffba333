"""An out-of-core run stopped at any block and started again ends with the same checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from out_of_core_runs import RECIPES, SETTINGS, assert_same_checkpoint, token_ids

from lightning_compress.export.errors import ExportError
from lightning_compress.export.manifest import MANIFEST_NAME
from lightning_compress.export.streaming import WORK_SUFFIX, StreamingCheckpoint
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import Modifier
from lightning_compress.pipelines.checkpoint_source import CheckpointSource


class Killed(Exception):
    """Stands for the process dying."""


def stop_at_write(monkeypatch, part: int) -> None:
    """The ``part``-th write (0-based: the blocks, then the modules outside them) dies."""
    write = StreamingCheckpoint.write_modules
    calls = []

    def dying(self, model, modules):
        calls.append(modules)
        if len(calls) == part + 1:
            raise Killed(f"killed while writing {modules}")
        return write(self, model, modules)

    monkeypatch.setattr(StreamingCheckpoint, "write_modules", dying)


def loaded_modules(monkeypatch) -> list[str]:
    names: list[str] = []
    load = CheckpointSource.load

    def spy(self, module):
        names.append(self.name_of(module))
        return load(self, module)

    monkeypatch.setattr(CheckpointSource, "load", spy)
    return names


def run(directory, output, recipe="sparsegpt_then_gptq", data=None):
    return oneshot(
        str(directory),
        RECIPES[recipe](),
        token_ids() if data is None else data,
        output_dir=output,
        out_of_core=True,
        **SETTINGS,
    )


@pytest.mark.parametrize(
    ("recipe", "killed_at"),  # the second block, or the modules outside the blocks
    [("sparsegpt_then_gptq", 1), ("sparsegpt_then_gptq", 3), ("awq_rtn", 1)],
)
def test_a_run_killed_at_a_block_resumes_to_the_uninterrupted_checkpoint(
    saved_llama, tmp_path, monkeypatch, recipe, killed_at
):
    directory = saved_llama()
    run(directory, tmp_path / "whole", recipe)
    with monkeypatch.context() as patch:
        stop_at_write(patch, killed_at)
        with pytest.raises(Killed):
            run(directory, tmp_path / "resumed", recipe)
    assert not (tmp_path / "resumed").exists()
    loaded = loaded_modules(monkeypatch)
    run(directory, tmp_path / "resumed", recipe)
    assert_same_checkpoint(tmp_path / "whole", tmp_path / "resumed")
    blocks = [name for name in loaded if name.startswith("model.layers.")]
    assert blocks == [f"model.layers.{i}" for i in range(killed_at, 3)]


def test_a_resumed_run_with_other_data_is_refused_naming_it(saved_llama, tmp_path, monkeypatch):
    directory = saved_llama()
    with monkeypatch.context() as patch:
        stop_at_write(patch, 1)
        with pytest.raises(Killed):
            run(directory, tmp_path / "out")
    with pytest.raises(ExportError, match="samples"):
        run(directory, tmp_path / "out", data=token_ids().flip(0))
    with pytest.raises(ExportError, match="recipe"):
        run(directory, tmp_path / "out", recipe="gptq")
    assert torch.equal(token_ids(), token_ids())


CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
import torch
from out_of_core_runs import RECIPES, SETTINGS, token_ids
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.modifiers import Modifier
from lightning_compress.pipelines.checkpoint_source import CheckpointSource

torch.set_num_threads(1)
load = CheckpointSource.load
def slow(self, module):  # leaves time to be killed while a block is being compressed
    time.sleep(0.5)
    load(self, module)
CheckpointSource.load = slow
oneshot({model!r}, RECIPES["sparsegpt_then_gptq"](), token_ids(), output_dir={out!r},
        out_of_core=True, **SETTINGS)
"""


@pytest.mark.slow
def test_a_process_killed_with_sigkill_resumes_to_the_uninterrupted_checkpoint(
    saved_llama, tmp_path
):
    directory = saved_llama()
    run(directory, tmp_path / "whole")
    output = tmp_path / "resumed"
    manifest = tmp_path / f".{output.name}{WORK_SUFFIX}" / MANIFEST_NAME
    code = CHILD.format(tests=str(Path(__file__).parents[1]), model=str(directory), out=str(output))
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 300
    while not (manifest.exists() and len(json.loads(manifest.read_text())["parts"]) >= 2):
        assert child.poll() is None and time.monotonic() < deadline, "the run ended too early"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not output.exists()
    run(directory, output)
    assert_same_checkpoint(tmp_path / "whole", output)


class PerBlockState(Modifier):
    """A modifier that does not say what it keeps per block."""


def test_a_modifier_that_cannot_forget_a_finished_block_refuses_to_resume():
    modifier = PerBlockState()
    modifier.skip_block(None, torch.nn.Linear(2, 2))  # inactive: nothing planned to forget
    modifier.started_ = True
    with pytest.raises(NotImplementedError, match="PerBlockState cannot resume a run"):
        modifier.skip_block(None, torch.nn.Linear(2, 2))
