"""The notebooks in notebooks/ run top to bottom and show what they say they show.

Each notebook runs in a fresh kernel, in a temporary copy of the repository's layout
(``notebooks/`` beside ``configs/``), so whatever it writes stays out of the working tree.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT = 300  # seconds; a whole notebook takes about a minute on two cores


def run_notebook(name: str, tmp_path: Path, monkeypatch) -> str:
    """Execute ``notebooks/<name>`` and return the text of all its outputs.

    nbclient raises ``CellExecutionError`` (with the cell's traceback) if a cell fails.
    """
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    workdir = tmp_path / "notebooks"
    workdir.mkdir()
    shutil.copy(ROOT / "notebooks" / name, workdir / name)
    # The kernel inherits this environment: plots render off screen, each process uses one
    # thread (as tests/conftest.py does: the machine is shared), and the `lightning-compress`
    # command installed beside this interpreter is found.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    notebook = nbformat.read(workdir / name, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return "\n".join(_output_text(cell) for cell in notebook.cells if cell.cell_type == "code")


def _output_text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for output in cell.get("outputs", []):
        if "text" in output:
            parts.append(output["text"])
        data = output.get("data", {})
        parts.append(data.get("text/markdown", data.get("text/plain", "")))
    return "\n".join(parts)


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"no match for {pattern!r} in the notebook's output:\n{text[-3000:]}"
    return float(match.group(1))


def test_training_aware(tmp_path, monkeypatch):
    text = run_notebook("training_aware.ipynb", tmp_path, monkeypatch)
    # The pruned layers end at the 50% target (quantization may round a few more to zero).
    assert 50.0 <= _number(r"sparsity of the pruned layers: ([\d.]+)%", text) < 55.0
    assert "on the int8 grid: True" in text
    before = _number(r"held-out perplexity: ([\d.]+) before", text)
    after = _number(r"before, ([\d.]+) after", text)
    assert 1.0 < before < after < 1.5 * before


def test_one_shot(tmp_path, monkeypatch):
    text = run_notebook("one_shot.ipynb", tmp_path, monkeypatch)
    table = dict(re.findall(r"^\| ([^|]+?) \| ([\d.]+) \|", text, flags=re.MULTILINE))
    assert set(table) == {"FP32", "RTN W4A16", "GPTQ W4A16", "SparseGPT 2:4"}
    perplexity = {name: float(value) for name, value in table.items()}
    assert all(math.isfinite(value) and value > 1.0 for value in perplexity.values())
    # GPTQ rounds better than round-to-nearest; 2:4 sparsity costs more, but not much.
    assert perplexity["GPTQ W4A16"] < perplexity["RTN W4A16"]
    assert perplexity["FP32"] < perplexity["SparseGPT 2:4"] < 1.1 * perplexity["FP32"]
    # The per-layer errors: GPTQ moves the weights more than RTN, the outputs less.
    errors = {
        method: (float(weight), float(output))
        for method, weight, output in re.findall(
            r"^(.+?) +mean weight error ([\d.]+), mean output error ([\d.]+)$",
            text,
            flags=re.MULTILINE,
        )
    }
    assert set(errors) == {"RTN W4A16", "GPTQ W4A16", "SparseGPT 2:4"}
    assert errors["GPTQ W4A16"][0] > errors["RTN W4A16"][0]
    assert errors["GPTQ W4A16"][1] < errors["RTN W4A16"][1]


def test_lightning_cli(tmp_path, monkeypatch):
    text = run_notebook("lightning_cli.ipynb", tmp_path, monkeypatch)
    before = _number(r"evaluation text: ([\d.]+) before compression", text)
    after = _number(r"before compression, ([\d.]+) after", text)
    assert before > 1.0 and abs(after / before - 1) < 0.05  # 4-bit GPTQ costs little
    # 50% of every pruned layer; lm_head (2% of the linear weights) stays dense.
    assert 48.0 < _number(r"sparsity of all linear layers at the end: ([\d.]+)%", text) < 50.0
    assert (tmp_path / "notebooks" / "lightning_logs" / "gradual_pruning" / "cli").is_dir()
