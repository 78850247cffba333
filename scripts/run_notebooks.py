"""Run the notebooks in ``notebooks/`` and save them with their outputs.

Each notebook runs top to bottom in a fresh kernel, in a temporary copy of the repository's
layout (``notebooks/`` beside ``configs/``), so what it writes (logs, checkpoints) stays out of
the working tree; only the executed notebook is written back, in place. The test-suite
(``tests/test_notebooks.py``) executes them the same way without writing them back.

Usage:
    python scripts/run_notebooks.py [NAME.ipynb ...]   # all notebooks when no name is given
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT = 300  # seconds; a whole notebook takes about a minute on two cores


def kernel_environment() -> dict[str, str]:
    """The environment the notebooks' kernels run in.

    Each process uses one thread (the machine is shared), and the ``lightning-compress``
    command installed beside this interpreter is found. Plots render inline, as images in the
    notebook (ipykernel's default backend).

    Returns:
        A copy of this process's environment with those settings.
    """
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def execute_notebook(
    path: Path,
    workdir: Path,
    before_each_cell: Callable[[NotebookClient], None] | None = None,
    kernel_log: IO[bytes] | None = None,
) -> nbformat.NotebookNode:
    """Execute a copy of the notebook at ``path`` inside ``workdir``.

    ``workdir`` receives ``configs/`` and ``notebooks/``, and the kernel starts in the latter,
    so the notebook's relative paths (``../configs``) and everything it writes stay there.

    Args:
        path: the notebook to run; the file is only read.
        workdir: an empty folder for the run.
        before_each_cell: called with the running client (its kernel started) before each
            cell; what it raises ends the run, and the kernel is shut down.
        kernel_log: a file for what the kernel process itself prints (its warnings, a crash),
            as opposed to the cells' outputs; by default it goes where this process prints.

    Returns:
        The executed notebook, with its outputs.

    Raises:
        nbclient.exceptions.CellExecutionError: when a cell fails (with the cell's traceback).
    """
    shutil.copytree(ROOT / "configs", workdir / "configs")
    notebook_dir = workdir / "notebooks"
    notebook_dir.mkdir()
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(notebook_dir)}},
    )
    if before_each_cell is not None:
        client.on_cell_start = lambda **_: before_each_cell(client)
    client.execute(env=kernel_environment(), stdout=kernel_log, stderr=kernel_log)
    return notebook


def regenerate(path: Path) -> float:
    """Execute the notebook at ``path`` and overwrite it with its outputs.

    The file is written only after every cell has run, so a failing notebook is left as it was.

    Args:
        path: the notebook.

    Returns:
        The seconds the run took.
    """
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="notebook-") as workdir:
        notebook = execute_notebook(path, Path(workdir))
    nbformat.validate(notebook)
    nbformat.write(notebook, path)
    return time.perf_counter() - begin


def main() -> None:
    """Regenerate the notebooks named on the command line, or all of them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names in notebooks/")
    args = parser.parse_args()
    paths = [NOTEBOOKS / name for name in args.names] or sorted(NOTEBOOKS.glob("*.ipynb"))
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        parser.error(f"no such notebook: {', '.join(missing)}")
    for path in paths:
        print(f"{path.relative_to(ROOT)}: running", flush=True)
        print(f"{path.relative_to(ROOT)}: saved with its outputs ({regenerate(path):.0f} s)")


if __name__ == "__main__":
    main()
