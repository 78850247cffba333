"""The notebooks in notebooks/ run top to bottom and show what they say they show.

Each notebook runs in a fresh kernel, in a temporary copy of the repository's layout
(``notebooks/`` beside ``configs/``), so whatever it writes stays out of the working tree and the
committed notebook is left as it is (``scripts/run_notebooks.py`` runs them the same way and
saves their outputs). The committed notebooks hold the outputs of such a run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

pytestmark = pytest.mark.notebook

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_NAMES = [
    "lightning_cli.ipynb",
    "one_shot.ipynb",
    "ptq_qat_qad.ipynb",
    "training_aware.ipynb",
]
# A cell that prints or displays at its top level (not inside a function it defines).
PRINTS = re.compile(r"^(print|display|output = lightning_compress)\(", re.MULTILINE)
_SPEC = importlib.util.spec_from_file_location(
    "run_notebooks", ROOT / "scripts" / "run_notebooks.py"
)
run_notebooks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run_notebooks)


def run_notebook(name: str, tmp_path: Path) -> str:
    """Execute ``notebooks/<name>`` and return the text of all its outputs.

    nbclient raises ``CellExecutionError`` (with the cell's traceback) if a cell fails.
    """
    path = ROOT / "notebooks" / name
    committed = hashlib.sha256(path.read_bytes()).hexdigest()
    notebook = run_notebooks.execute_notebook(path, tmp_path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == committed
    text = _notebook_text(notebook)
    _assert_plain(text, name)
    return text


def _notebook_text(notebook: nbformat.NotebookNode) -> str:
    return "\n".join(_output_text(cell) for cell in notebook.cells if cell.cell_type == "code")


def _assert_plain(text: str, name: str) -> None:
    """No terminal escape codes or carriage returns (progress bars) in the outputs."""
    for code, what in (("\x1b", "a terminal escape code"), ("\r", "a carriage return")):
        assert code not in text, (
            f"{name}: {what} in the outputs, near {text[max(0, text.find(code) - 200) :][:400]!r}"
        )


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


def test_training_aware(tmp_path):
    text = run_notebook("training_aware.ipynb", tmp_path)
    # The pruned layers end at the 50% target (quantization may round a few more to zero).
    assert 50.0 <= _number(r"sparsity of the pruned layers: ([\d.]+)%", text) < 55.0
    assert "on the int8 grid: True" in text
    before = _number(r"held-out perplexity: ([\d.]+) before", text)
    after = _number(r"before, ([\d.]+) after", text)
    assert 1.0 < before < after < 1.5 * before


def test_one_shot(tmp_path):
    text = run_notebook("one_shot.ipynb", tmp_path)
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


def test_lightning_cli(tmp_path):
    text = run_notebook("lightning_cli.ipynb", tmp_path)
    before = _number(r"evaluation text: ([\d.]+) before compression", text)
    after = _number(r"before compression, ([\d.]+) after", text)
    assert before > 1.0 and abs(after / before - 1) < 0.05  # 4-bit GPTQ costs little
    # 50% of every pruned layer; lm_head (2% of the linear weights) stays dense.
    assert 48.0 < _number(r"sparsity of all linear layers at the end: ([\d.]+)%", text) < 50.0
    assert (tmp_path / "notebooks" / "lightning_logs" / "gradual_pruning" / "cli").is_dir()


def test_ptq_qat_qad(tmp_path):
    text = run_notebook("ptq_qat_qad.ipynb", tmp_path)
    float_model = _number(r"float model: held-out perplexity ([\d.]+)", text)
    ptq = _number(r"PTQ \(GPTQ W2 g64\): held-out perplexity ([\d.]+)", text)
    ptq_kl = _number(r"PTQ \(GPTQ W2 g64\): held-out perplexity [\d.]+, KL ([\d.]+)", text)
    runs = {
        name: [float(value) for value in values]
        for name, *values in re.findall(
            r"^(QAT|QAD): held-out perplexity ([\d.]+) at step 0, ([\d.]+) after \d+ steps, "
            r"KL ([\d.]+)$",
            text,
            flags=re.MULTILINE,
        )
    }
    assert set(runs) == {"QAT", "QAD"}
    assert float_model < ptq  # 2-bit GPTQ costs perplexity
    for start, _, _ in runs.values():
        assert start == ptq  # both trainings start at the GPTQ model
    qat_end, qat_kl = runs["QAT"][1:]
    qad_end, qad_kl = runs["QAD"][1:]
    assert qad_end < ptq and qad_end <= qat_end  # distillation recovers the most
    assert qad_kl < qat_kl and qad_kl < 2 * ptq_kl  # and stays closest to the float model


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_committed_notebooks_show_their_outputs(name):
    notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    # Run top to bottom in one kernel, every cell once, none failed.
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    # Every cell that prints or displays shows it; every plot is an image.
    for cell in code:
        if PRINTS.search(cell.source):
            assert cell.outputs, f"{name}: no outputs committed for:\n{cell.source}"
        if "plt.show()" in cell.source:
            assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source
    _assert_plain(_notebook_text(notebook), name)


def test_every_notebook_is_tested():
    assert sorted(path.name for path in (ROOT / "notebooks").glob("*.ipynb")) == NOTEBOOK_NAMES


def _scratch_notebook(path: Path, source: str) -> bytes:
    """Write a one-cell notebook without outputs to ``path``; return its bytes."""
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)]), path)
    return path.read_bytes()


def test_regenerating_a_notebook_saves_its_outputs_in_place(tmp_path):
    path = tmp_path / "scratch.ipynb"
    _scratch_notebook(path, "import os\nprint(sorted(os.listdir('..')))")
    run_notebooks.regenerate(path)
    (cell,) = nbformat.read(path, as_version=4).cells
    assert cell.execution_count == 1
    # The kernel ran in a temporary copy of the layout: notebooks/ beside configs/.
    assert cell.outputs[0]["text"] == "['configs', 'notebooks']\n"
    assert not (tmp_path / "configs").exists()


def test_a_failing_notebook_is_left_as_it_was(tmp_path):
    path = tmp_path / "failing.ipynb"
    before = _scratch_notebook(path, "print('partial output')\nraise ValueError('broken cell')")
    with pytest.raises(CellExecutionError, match="broken cell"):
        run_notebooks.regenerate(path)
    assert path.read_bytes() == before
