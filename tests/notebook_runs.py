"""Execute the notebooks a test session checks, one after another, in a background thread.

The main test pass computes on one thread (``tests/conftest.py``), so on a two-core machine the
second core sits idle while the notebooks' tests, minutes of kernel time, wait their turn at the
end of the suite. ``tests/conftest.py`` therefore starts the selected notebooks here as the session
starts: a single worker thread executes them in turn, each in its own kernel on one thread (see
``scripts/run_notebooks.py``), and each notebook test waits for its own run and checks its
outputs. Nothing starts when no notebook test is selected, and the session's end stops what is
still running (its kernel and the commands that kernel started).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import IO

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
_SPEC = importlib.util.spec_from_file_location(
    "run_notebooks", ROOT / "scripts" / "run_notebooks.py"
)
run_notebooks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run_notebooks)


def execute(
    path: Path,
    workdir: Path,
    before_each_cell: Callable[[NotebookClient], None] | None = None,
    kernel_log: IO[bytes] | None = None,
) -> nbformat.NotebookNode:
    """Execute the notebook at ``path`` in ``workdir``, leaving the file as it is.

    Args:
        path: the notebook.
        workdir: an empty folder for the run (see ``run_notebooks.execute_notebook``).
        before_each_cell: passed on to ``run_notebooks.execute_notebook``.
        kernel_log: passed on to ``run_notebooks.execute_notebook``.

    Returns:
        The executed notebook, with its outputs.

    Raises:
        nbclient.exceptions.CellExecutionError: when a cell fails (with the cell's traceback).
        AssertionError: when the run changed the notebook's file.
    """
    committed = hashlib.sha256(path.read_bytes()).hexdigest()
    notebook = run_notebooks.execute_notebook(path, workdir, before_each_cell, kernel_log)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == committed, f"{path} was modified"
    return notebook


class NotebookRuns:
    """Notebooks executing one after another in a background thread, started at construction.

    Args:
        paths: the notebooks, in the order to run them.
        workdir: an empty folder; each notebook runs in its own subfolder, named after it,
            where its kernel's own messages go to ``kernel.log``.
    """

    def __init__(self, paths: list[Path], workdir: Path) -> None:
        self._runs = {path: Future() for path in dict.fromkeys(paths)}
        self._workdirs = {
            path: workdir / f"{index}-{path.stem}" for index, path in enumerate(self._runs)
        }
        self._lock = threading.Lock()
        self._stopped = False
        self._client: NotebookClient | None = None  # while one of its cells runs
        self._thread = threading.Thread(target=self._run_all, name="notebooks", daemon=True)
        self._thread.start()

    def result(self, path: Path) -> tuple[nbformat.NotebookNode, Path]:
        """Wait for a notebook's run.

        Args:
            path: one of the notebooks the runs were started with.

        Returns:
            The executed notebook and the folder it ran in (``notebooks/`` beside ``configs/``).

        Raises:
            KeyError: when ``path`` was not started.
            concurrent.futures.CancelledError: when the runs were stopped before this one began.
            Exception: what executing the notebook raised (see :func:`execute`).
        """
        if path not in self._runs:
            raise KeyError(f"the notebook {path} was not started; started: {list(self._runs)}")
        return self._runs[path].result(), self._workdirs[path]

    def stop(self) -> None:
        """Cancel the runs not begun, end the running one, and wait for the thread to finish."""
        with self._lock:
            self._stopped = True
            for run in self._runs.values():
                run.cancel()
            # None before the kernel starts and once it is shut down.
            provisioner = getattr(self._client and self._client.km, "provisioner", None)
            if provisioner is not None and provisioner.pgid:
                # The kernel leads its own process group, with the commands its cells started.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(provisioner.pgid, signal.SIGKILL)
        self._thread.join()

    def _before_each_cell(self, client: NotebookClient) -> None:
        with self._lock:
            if self._stopped:
                raise RuntimeError("the notebook runs were stopped")
            self._client = client

    def _run_all(self) -> None:
        for path, run in self._runs.items():
            if not run.set_running_or_notify_cancel():
                continue
            try:
                notebook = self._execute(path)
            except BaseException as error:  # handed to whoever waits for this run
                run.set_exception(error)
            else:
                run.set_result(notebook)

    def _execute(self, path: Path) -> nbformat.NotebookNode:
        workdir = self._workdirs[path]
        try:
            workdir.mkdir()
            with open(workdir / "kernel.log", "wb") as kernel_log:
                return execute(path, workdir, self._before_each_cell, kernel_log)
        finally:
            with self._lock:
                self._client = None
