"""The notebooks in notebooks/ run top to bottom and show what they say they show.

Each notebook runs in a fresh kernel, in a temporary copy of the repository's layout
(``notebooks/`` beside ``configs/``), so whatever it writes stays out of the working tree and the
committed notebook is left as it is (``scripts/run_notebooks.py`` runs them the same way and
saves their outputs). The committed notebooks hold the outputs of such a run.

A test marked ``@pytest.mark.notebook("NAME.ipynb")`` checks the outputs of that notebook's run.
The selected notebooks start executing, one after another in a background thread, as the session
starts (the ``notebook_runs`` fixture in ``conftest.py``, ``notebook_runs.py``): their kernels
compute on the core the rest of the suite, one thread per test, leaves idle, and by the time
their tests come they have usually finished. Nothing starts when none of them is selected.
"""

from __future__ import annotations

import math
import re
import time
from concurrent.futures import CancelledError
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError, DeadKernelError
from notebook_runs import NotebookRuns, run_notebooks

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


@pytest.fixture
def notebook_run(request, notebook_runs) -> tuple[str, Path]:
    """The text of all outputs of the test's notebook (its ``notebook`` mark), and its folder.

    The notebook runs in the background from the session's start (``notebook_runs.py``); if a
    cell failed, the test fails naming the notebook, with the cell and its traceback.
    """
    (name,) = request.node.get_closest_marker("notebook").args
    try:
        notebook, workdir = notebook_runs.result(ROOT / "notebooks" / name)
    except CellExecutionError as error:
        pytest.fail(f"notebooks/{name}: {error}", pytrace=False)
    text = _notebook_text(notebook)
    _assert_plain(text, name)
    return text, workdir


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


@pytest.mark.notebook("training_aware.ipynb")
def test_training_aware(notebook_run):
    text, _ = notebook_run
    # The pruned layers end at the 50% target (quantization may round a few more to zero).
    assert 50.0 <= _number(r"sparsity of the pruned layers: ([\d.]+)%", text) < 55.0
    assert "on the int8 grid: True" in text
    before = _number(r"held-out perplexity: ([\d.]+) before", text)
    after = _number(r"before, ([\d.]+) after", text)
    assert 1.0 < before < after < 1.5 * before


@pytest.mark.notebook("one_shot.ipynb")
def test_one_shot(notebook_run):
    text, _ = notebook_run
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


@pytest.mark.notebook("lightning_cli.ipynb")
def test_lightning_cli(notebook_run):
    text, workdir = notebook_run
    before = _number(r"evaluation text: ([\d.]+) before compression", text)
    after = _number(r"before compression, ([\d.]+) after", text)
    assert before > 1.0 and abs(after / before - 1) < 0.05  # 4-bit GPTQ costs little
    # 50% of every pruned layer; lm_head (2% of the linear weights) stays dense.
    assert 48.0 < _number(r"sparsity of all linear layers at the end: ([\d.]+)%", text) < 50.0
    assert (workdir / "notebooks" / "lightning_logs" / "gradual_pruning" / "cli").is_dir()


@pytest.mark.notebook("ptq_qat_qad.ipynb")
def test_ptq_qat_qad(notebook_run):
    text, _ = notebook_run
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


def test_a_background_run_hands_its_notebook_or_its_error_to_whoever_waits(tmp_path):
    failing, printing = tmp_path / "failing.ipynb", tmp_path / "printing.ipynb"
    _scratch_notebook(failing, "raise ValueError('broken cell')")
    _scratch_notebook(printing, "print('shown')")
    runs = NotebookRuns([failing, printing], tmp_path)
    try:
        (cell,) = runs.result(printing)[0].cells
        with pytest.raises(CellExecutionError, match="broken cell"):
            runs.result(failing)
    finally:
        runs.stop()
    assert cell.outputs[0]["text"] == "shown\n"
    with pytest.raises(KeyError, match="not started"):
        runs.result(tmp_path / "other.ipynb")


def test_stopping_the_runs_kills_the_running_kernel_with_its_commands_and_starts_no_more(
    tmp_path,
):
    sleeping, next_one = tmp_path / "sleeping.ipynb", tmp_path / "next.ipynb"
    pid_file = tmp_path / "child.pid"
    _scratch_notebook(
        sleeping,
        "import pathlib, subprocess\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        f"pathlib.Path({str(pid_file)!r}).write_text(str(child.pid))\n"
        "child.wait()",
    )
    _scratch_notebook(next_one, "print('never')")
    runs = NotebookRuns([sleeping, next_one], tmp_path)
    deadline = time.monotonic() + 120
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the notebook's cell did not start"
        time.sleep(0.1)
    runs.stop()
    with pytest.raises(DeadKernelError):
        runs.result(sleeping)
    with pytest.raises(CancelledError):
        runs.result(next_one)
    status = Path(f"/proc/{pid_file.read_text()}/status")
    # Gone, or a zombie its new parent has not reaped yet: killed either way.
    assert not status.exists() or "State:\tZ" in status.read_text()


def test_no_notebook_runs_when_no_test_that_runs_one_is_selected(tmp_path):
    passed = []

    class Passed:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" and report.passed:
                passed.append(report.nodeid)

    # These tests carry the notebook mark but only read the committed notebooks.
    args = [__file__, "-k", "committed", "-p", "no:cacheprovider", "--basetemp", str(tmp_path)]
    assert pytest.main(args, plugins=[Passed()]) == pytest.ExitCode.OK
    assert len(passed) == len(NOTEBOOK_NAMES)
    assert not list(tmp_path.glob("notebooks*"))
