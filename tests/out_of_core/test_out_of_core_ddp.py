"""Out-of-core runs under two CPU processes (ddp_fork, ddp_spawn; gloo): rank zero alone
writes the checkpoint, which is the one-process run's, bit for bit; a run stopped by an error
writing it stops on both ranks and resumes to the same checkpoint, each rank from its saved
block inputs (under another number of processes, computing the blocks again). Lightning's
``ddp``, which runs the script again, is in ``test_out_of_core_choice_ddp``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch.distributed as dist
from out_of_core_runs import RECIPES, assert_same_checkpoint, token_ids

from lightning_compress.export.manifest import MANIFEST_NAME
from lightning_compress.export.streaming import WORK_SUFFIX, StreamingCheckpoint
from lightning_compress.lightning.oneshot import oneshot
from lightning_compress.pipelines.checkpoint_source import CheckpointSource

pytestmark = pytest.mark.distributed

SETTINGS = {
    "num_calibration_samples": 4,
    "batch_size": 1,
    "progress": False,
    "out_of_core": True,
    "trainer_kwargs": {"accelerator": "cpu"},
}
RECIPE = RECIPES["sparsegpt_then_gptq"]


def compress(
    directory: Path, output_dir: Path, processes: int, strategy: str = "ddp_fork"
) -> object:
    strategy = {"devices": 2, "strategy": strategy} if processes == 2 else {"devices": 1}
    return oneshot(
        str(directory), RECIPE(), token_ids(), output_dir=output_dir, **SETTINGS, **strategy
    )


def recording_opens(monkeypatch, record: Path) -> None:
    """``StreamingCheckpoint.open`` noting, in ``record``, the rank of each process opening it."""
    open_ = StreamingCheckpoint.open.__func__

    def opening(cls, *args, **kwargs):
        with record.open("a") as file:
            file.write(f"{dist.get_rank() if dist.is_initialized() else 'main'} {os.getpid()}\n")
        return open_(cls, *args, **kwargs)

    monkeypatch.setattr(StreamingCheckpoint, "open", classmethod(opening))


def test_two_processes_write_the_one_process_checkpoint_from_rank_zero(
    saved_llama, tmp_path, monkeypatch
):
    directory = saved_llama()
    compress(directory, tmp_path / "single", processes=1)
    recording_opens(monkeypatch, tmp_path / "opens.txt")
    model = compress(directory, tmp_path / "ddp", processes=2)
    assert_same_checkpoint(tmp_path / "single", tmp_path / "ddp")
    assert all(tensor.is_meta for tensor in model.parameters())
    opens = (tmp_path / "opens.txt").read_text().split()
    assert opens[0] == "0" and len(opens) == 2  # rank zero only, once
    assert int(opens[1]) != os.getpid()  # in the worker that calibrated


def test_ddp_spawn_workers_write_the_one_process_checkpoint(saved_llama, tmp_path):
    directory = saved_llama()
    compress(directory, tmp_path / "single", processes=1)
    model = compress(directory, tmp_path / "spawn", processes=2, strategy="ddp_spawn")
    assert_same_checkpoint(tmp_path / "single", tmp_path / "spawn")
    assert all(tensor.is_meta for tensor in model.parameters())


def failing_write_of(monkeypatch, block: str) -> None:
    """Writing ``block`` fails as on a full disk."""
    write = StreamingCheckpoint.write_modules

    def full_disk(self, model, modules):
        if modules == block:
            raise OSError(28, "No space left on device")
        return write(self, model, modules)

    monkeypatch.setattr(StreamingCheckpoint, "write_modules", full_disk)


def stopped_by_a_full_disk(monkeypatch, directory: Path, output: Path, block: str) -> None:
    """Two processes compress ``directory`` into ``output`` until writing ``block`` fails."""
    with monkeypatch.context() as patch:
        failing_write_of(patch, block)
        with pytest.raises(Exception, match="No space left on device"):
            compress(directory, output, processes=2)


def recording_loads(monkeypatch, record: Path) -> None:
    """``CheckpointSource.load`` noting, in ``record``, each rank's module read."""
    load = CheckpointSource.load

    def loading(self, module):
        with record.open("a") as file:
            rank = dist.get_rank() if dist.is_initialized() else 0
            file.write(f"{rank} {self.name_of(module)}\n")
        return load(self, module)

    monkeypatch.setattr(CheckpointSource, "load", loading)


def blocks_read(record: Path) -> list[str]:
    lines = record.read_text().splitlines()
    return sorted(line for line in lines if "model.layers." in line)


def test_a_write_failing_on_rank_zero_stops_both_ranks_and_each_resumes_from_its_inputs(
    saved_llama, tmp_path, monkeypatch
):
    directory = saved_llama()
    compress(directory, tmp_path / "single", processes=1)
    stopped_by_a_full_disk(monkeypatch, directory, tmp_path / "ddp", "model.layers.2")
    assert not (tmp_path / "ddp").exists()
    writes = tmp_path / "writes.txt"
    write = StreamingCheckpoint.write_modules

    def recording(self, model, modules):
        with writes.open("a") as file:
            file.write(f"{modules}\n")
        return write(self, model, modules)

    monkeypatch.setattr(StreamingCheckpoint, "write_modules", recording)
    recording_loads(monkeypatch, tmp_path / "loads.txt")
    compress(directory, tmp_path / "ddp", processes=2)
    assert writes.read_text().splitlines()[0] == "model.layers.2"  # 0 and 1 kept
    # blocks 0 and 1 neither read nor computed again: each rank starts from its saved inputs
    assert blocks_read(tmp_path / "loads.txt") == ["0 model.layers.2", "1 model.layers.2"]
    assert_same_checkpoint(tmp_path / "single", tmp_path / "ddp")


def test_a_run_of_two_processes_resumed_by_one_computes_the_blocks_again(
    saved_llama, tmp_path, monkeypatch, messages
):
    directory = saved_llama()
    compress(directory, tmp_path / "single", processes=1)
    stopped_by_a_full_disk(monkeypatch, directory, tmp_path / "resumed", "model.layers.1")
    recording_loads(monkeypatch, tmp_path / "loads.txt")
    compress(directory, tmp_path / "resumed", processes=1)
    assert blocks_read(tmp_path / "loads.txt") == [f"0 model.layers.{i}" for i in range(3)]
    assert any("shares of 2 processes and this run has 1" in message for message in messages)
    assert_same_checkpoint(tmp_path / "single", tmp_path / "resumed")


@pytest.mark.parametrize("unseen", ["saving", "resuming"])
def test_block_inputs_a_rank_cannot_see_are_not_used_and_the_blocks_are_computed_again(
    saved_llama, tmp_path, monkeypatch, unseen
):
    directory = saved_llama()
    compress(directory, tmp_path / "single", processes=1)
    is_dir = Path.is_dir

    def work_directory_on_rank_zero_only(path: Path) -> bool:  # as without a shared disk
        if WORK_SUFFIX in str(path) and dist.is_initialized() and dist.get_rank() == 1:
            return False
        return is_dir(path)

    with monkeypatch.context() as patch:
        if unseen == "saving":
            patch.setattr(Path, "is_dir", work_directory_on_rank_zero_only)
        stopped_by_a_full_disk(patch, directory, tmp_path / "ddp", "model.layers.2")
    manifest = json.loads((tmp_path / f".ddp{WORK_SUFFIX}" / MANIFEST_NAME).read_text())
    assert len(manifest["parts"]) == 2
    assert (manifest["activations"] is None) == (unseen == "saving")
    monkeypatch.setattr(Path, "is_dir", work_directory_on_rank_zero_only)
    recording_loads(monkeypatch, tmp_path / "loads.txt")
    compress(directory, tmp_path / "ddp", processes=2)
    assert blocks_read(tmp_path / "loads.txt") == [
        f"{rank} model.layers.{block}" for rank in range(2) for block in range(3)
    ]
    assert_same_checkpoint(tmp_path / "single", tmp_path / "ddp")
