"""Under several processes every rank makes the same ``out_of_core="auto"`` choice, whatever
memory each one sees: reduced over ``torch.distributed`` where it runs, taken from the
launching process by the processes Lightning's ``ddp`` starts."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist
from out_of_core_runs import RECIPES, assert_same_checkpoint, token_ids

from lightning_compress.core.checkpoint_files import CheckpointFiles
from lightning_compress.lightning import out_of_core_choice
from lightning_compress.lightning.oneshot import oneshot

pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_ranks(target, *args) -> list[int | None]:
    """Runs ``target(rank, *args, port)`` in two forked processes; their exit codes (None:
    still running after a minute, then killed)."""
    port = free_port()
    fork = multiprocessing.get_context("fork")
    ranks = [fork.Process(target=target, args=(rank, *args, port)) for rank in range(2)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join(timeout=60)
    codes = [rank.exitcode for rank in ranks]
    for rank in ranks:
        if rank.is_alive():
            rank.kill()
            rank.join()
    return codes


def choose_on_rank(rank: int, directory: Path, memory: list, record: Path, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        out_of_core_choice.available_memory = lambda: memory[rank]
        choice = out_of_core_choice.choose_out_of_core("auto", directory)
        (record / f"rank-{rank}").write_text(str(choice))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    ("memory", "chosen"),  # memory per rank, in multiples of the weights
    [((100, 1.9), "True"), ((1.9, 100), "True"), ((100, None), "False")],
)
def test_connected_ranks_choose_from_the_least_memory_of_all(saved_llama, tmp_path, memory, chosen):
    directory = saved_llama()
    weights = CheckpointFiles(directory).nbytes
    per_rank = [None if share is None else int(share * weights) for share in memory]
    assert run_two_ranks(choose_on_rank, directory, per_rank, tmp_path) == [0, 0]
    assert [(tmp_path / f"rank-{rank}").read_text() for rank in range(2)] == [chosen, chosen]


SCRIPT = """
import os, sys
sys.path.insert(0, {tests!r})
import torch
from out_of_core_runs import RECIPES, token_ids
from lightning_compress.lightning import out_of_core_choice
from lightning_compress.lightning.oneshot import oneshot

rank = int(os.environ.get("LOCAL_RANK", "0"))
out_of_core_choice.available_memory = lambda: {memory!r}[rank]
torch.set_num_threads(1)
model = oneshot({model!r}, RECIPES["sparsegpt_then_gptq"](), token_ids(), output_dir={out!r},
                num_calibration_samples=4, batch_size=1, progress=False, devices=2,
                strategy="ddp", trainer_kwargs={{"accelerator": "cpu"}})
with open({record!r}, "a") as file:
    file.write(f"{{rank}} {{all(tensor.is_meta for tensor in model.parameters())}}\\n")
"""


@pytest.mark.slow  # about 30 s: the script runs in two new interpreters
def test_ranks_lightning_ddp_starts_take_the_first_ranks_choice_and_match_one_process(
    saved_llama, tmp_path
):
    directory = saved_llama()
    oneshot(
        str(directory),
        RECIPES["sparsegpt_then_gptq"](),
        token_ids(),
        output_dir=tmp_path / "single",
        num_calibration_samples=4,
        batch_size=1,
        progress=False,
        out_of_core=True,
        trainer_kwargs={"accelerator": "cpu"},
    )
    weights = CheckpointFiles(directory).nbytes
    script = tmp_path / "compress.py"
    script.write_text(
        SCRIPT.format(
            tests=str(Path(__file__).parents[1]),
            memory=[int(1.9 * weights), 100 * weights],  # out of core on rank 0 only
            model=str(directory),
            out=str(tmp_path / "ddp"),
            record=str(tmp_path / "ranks.txt"),
        )
    )
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=240, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted((tmp_path / "ranks.txt").read_text().splitlines()) == ["0 True", "1 True"]
    assert "as the process that started this one chose" in run.stderr
    assert_same_checkpoint(tmp_path / "single", tmp_path / "ddp")


def test_a_rank_lightning_started_takes_the_choice_its_starter_left(
    saved_llama, monkeypatch, tmp_path
):
    directory = saved_llama()
    monkeypatch.setattr(out_of_core_choice, "available_memory", lambda: 1)
    assert out_of_core_choice.choose_out_of_core("auto", directory)  # the first rank
    monkeypatch.setattr(out_of_core_choice, "available_memory", lambda: 10**15)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert out_of_core_choice.choose_out_of_core("auto", directory)  # a rank it started
    other = tmp_path / "other"
    other.symlink_to(saved_llama(tie=True), target_is_directory=True)
    assert not out_of_core_choice.choose_out_of_core("auto", other)  # not chosen by the first


def test_ranks_started_apart_each_choose_with_a_warning(saved_llama, monkeypatch, messages):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(out_of_core_choice, "available_memory", lambda: 1)
    assert out_of_core_choice.choose_out_of_core("auto", saved_llama())
    assert any("one of 2 that were started apart" in message for message in messages)


def compress_on_rank(rank: int, directory: Path, record: Path, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE="2",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        NODE_RANK="0",
    )
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        oneshot(
            str(directory),
            RECIPES["gptq"](),
            token_ids(),
            output_dir=record / "out",
            num_calibration_samples=4,
            progress=False,
            out_of_core=rank == 0,
            devices=2,
            strategy="ddp",
            trainer_kwargs={"accelerator": "cpu"},
        )
    except RuntimeError as error:
        (record / f"rank-{rank}").write_text(str(error))
    finally:
        dist.destroy_process_group()


def test_ranks_that_chose_differently_are_refused_on_both(saved_llama, tmp_path):
    directory = saved_llama()
    assert run_two_ranks(compress_on_rank, directory, tmp_path) == [0, 0]
    for rank in range(2):
        assert (
            "ranks disagree on reading the weights one block at a time"
            in (tmp_path / f"rank-{rank}").read_text()
        )
    assert not (tmp_path / "out").exists()
