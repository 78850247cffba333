"""Calibration data files: which file a ``dataset`` string names, and the records in it.

Read a file with ``calibration_samples(path, num_samples, max_seq_length, tokenizer,
text_column="text", concatenate_data=None)`` or ``oneshot(model, recipe, dataset=path, ...)``.

A ``dataset`` string names a file where a file or directory of that name exists. A string of
one line that does not exist is taken for a path when it ends with a data-file suffix
(``.txt``, ``.json``, ``.jsonl``, ``.parquet``, ``.arrow``) or, without whitespace, holds a
path separator (a ``FileNotFoundError``), and for a dataset name (``"open_platypus"``, a
``ValueError``: hub datasets are not downloaded) when it has no whitespace. Any other string
(words separated by spaces or lines) is calibration text; give short text as a list of strings.

Files: ``.txt`` (UTF-8 text), ``.json`` (a list of records, or one record per line),
``.jsonl`` (one record per line), ``.parquet`` and ``.arrow`` (with pyarrow, from the ``data``
extra), or a directory written by ``datasets.Dataset.save_to_disk`` (with ``datasets``).
"""

from __future__ import annotations

import importlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["DATA_SUFFIXES", "dataset_path", "is_text_file", "read_items"]

DATA_SUFFIXES = (".txt", ".json", ".jsonl", ".parquet", ".arrow")
DATA_EXTRA = "pip install 'lightning-compress[data]'"
_LONGEST_PATH = 4096
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")

Item = tuple[str, Any]  # (where it came from, a text string or a record dict)


def dataset_path(dataset: str | os.PathLike) -> Path | None:
    """The file or directory that ``dataset`` names; None where a string is calibration text.

    Args:
        dataset: a path, or a string: a path, a dataset name, or calibration text (see the
            module's docstring for how they are told apart).

    Returns:
        The existing path, or None for calibration text.

    Raises:
        FileNotFoundError: if ``dataset`` is a path or looks like one and does not exist.
        ValueError: if ``dataset`` looks like a dataset name (one word that is no local path).
    """
    if isinstance(dataset, os.PathLike):
        return _existing(Path(dataset).expanduser(), str(dataset))
    if "\n" in dataset or len(dataset) > _LONGEST_PATH or not dataset.strip():
        return None
    path = Path(dataset).expanduser()
    if _exists(path):
        return path
    one_word = not any(character.isspace() for character in dataset)
    has_separator = "/" in dataset or os.sep in dataset
    if dataset.lower().endswith(DATA_SUFFIXES) or (one_word and has_separator):
        return _existing(path, dataset)
    if one_word:
        raise ValueError(
            f"dataset: {dataset!r} is not a local file or directory; Hugging Face Hub datasets "
            f"are not downloaded here. {_how_to_pass(dataset)}"
        )
    return None


def is_text_file(path: Path) -> bool:
    """Whether ``path`` is a plain-text file (read as one text, not as records)."""
    return path.suffix.lower() == ".txt"


def read_items(path: Path, whole_text: bool = True) -> Iterator[Item]:
    """The texts and records of the file or saved dataset at ``path``, with where each is.

    Args:
        path: an existing ``.txt``, ``.json``, ``.jsonl``, ``.parquet`` or ``.arrow`` file, or a
            directory written by ``datasets.Dataset.save_to_disk``.
        whole_text: read a ``.txt`` file as one text; else one text per non-blank line.

    Yields:
        ``(where, item)``: ``where`` names the file and the line, record or row; ``item`` is
        a string (text) or a dict (a record).

    Raises:
        ValueError: for an unknown suffix, a file that is not what its suffix says (not UTF-8,
            invalid JSON, not Parquet or Arrow), a directory that holds no saved dataset or
            several splits, or a file with no records.
        TypeError: for a JSON value that is neither a record nor a string.
        ImportError: if Parquet, Arrow or saved datasets are read without the ``data`` extra.
    """
    if path.is_dir():
        items = _saved_dataset(path)
    elif path.suffix.lower() in _READERS:
        items = _READERS[path.suffix.lower()](path, whole_text)
    else:
        raise ValueError(
            f"dataset: {path} has the suffix {path.suffix!r}; expected one of "
            f"{', '.join(DATA_SUFFIXES)} (plain text: .txt), or a directory written by "
            f"datasets.Dataset.save_to_disk"
        )
    empty = True
    for item in items:
        empty = False
        yield item
    if empty:
        raise ValueError(f"dataset: {path} holds no records; expected at least one")


def _how_to_pass(name: str) -> str:
    return (
        f"Pass a local file ({', '.join(DATA_SUFFIXES)}), e.g. written where the hub is "
        f"reachable with datasets.load_dataset({name!r}, split='train').to_json("
        f"'calibration.jsonl'), a directory written by datasets.Dataset.save_to_disk, or a "
        f"loaded datasets.Dataset; calibration text goes in a list of strings"
    )


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the system, or a NUL byte
        return False


def _existing(path: Path, given: str) -> Path:
    if _exists(path):
        return path
    hint = ""
    if _HUB_ID.fullmatch(given) and not given.lower().endswith(DATA_SUFFIXES):
        hint = (
            f"; if it names a Hugging Face Hub dataset: hub datasets are not downloaded here. "
            f"{_how_to_pass(given)}"
        )
    raise FileNotFoundError(
        f"dataset: no file or directory {given!r} (looked for {path.absolute()}){hint}"
    )


# ------------------------------------------------------------------ readers
def _text(path: Path, whole_text: bool) -> Iterator[Item]:
    text = _read_text(path)
    if whole_text:
        if text.strip():
            yield str(path), text
        return
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{path} line {number}", line


def _json(path: Path, whole_text: bool) -> Iterator[Item]:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg != "Extra data":  # several values: JSON Lines in a .json file
            raise _invalid_json(path, error) from error
        yield from _json_lines_of(path, text.splitlines())
        return
    records = value if isinstance(value, list) else [value]
    for index, record in enumerate(records):
        where = f"{path} record {index}"
        yield where, _record(record, where)


def _json_lines(path: Path, whole_text: bool) -> Iterator[Item]:
    yield from _json_lines_of(path, _read_text(path).splitlines())


def _json_lines_of(path: Path, lines: Iterable[str]) -> Iterator[Item]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where} is not valid JSON ({error.msg} at column {error.colno}); expected one "
                f"JSON object (a record) per line"
            ) from error
        yield where, _record(value, where)


def _parquet(path: Path, whole_text: bool) -> Iterator[Item]:
    parquet = _import("pyarrow.parquet", path)
    yield from _rows(path, "a Parquet file", lambda: parquet.ParquetFile(path).iter_batches())


def _arrow(path: Path, whole_text: bool) -> Iterator[Item]:
    ipc = _import("pyarrow.ipc", path)
    what = "an Arrow file (the IPC file or stream format that datasets.Dataset.save_to_disk writes)"
    yield from _rows(path, what, lambda: _arrow_batches(ipc, path))


def _arrow_batches(ipc: Any, path: Path) -> Iterator[Any]:
    pyarrow = _import("pyarrow", path)
    with pyarrow.memory_map(str(path)) as source:
        try:
            reader = ipc.open_file(source)
        except pyarrow.ArrowInvalid:  # no file footer: the stream format
            source.seek(0)
            yield from ipc.open_stream(source)
            return
        for index in range(reader.num_record_batches):
            yield reader.get_batch(index)


def _rows(path: Path, what: str, batches: Callable[[], Iterable[Any]]) -> Iterator[Item]:
    """The rows of the record ``batches`` that pyarrow reads from ``path``, as dicts."""
    pyarrow = _import("pyarrow", path)
    index = 0
    try:
        for batch in batches():
            for row in batch.to_pylist():
                yield f"{path} row {index}", row
                index += 1
    except (pyarrow.ArrowException, OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"dataset: {path} is not {what}, or is damaged after row {index} ({error})"
        ) from error


def _saved_dataset(path: Path) -> Iterator[Item]:
    if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
        raise ValueError(
            f"dataset: {path} is a directory without state.json or dataset_dict.json; expected a "
            f"data file ({', '.join(DATA_SUFFIXES)}) or a directory written by "
            f"datasets.Dataset.save_to_disk"
        )
    datasets = _import("datasets", path)
    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        raise ValueError(
            f"dataset: {path} holds the splits {sorted(dataset)}; expected one split: pass its "
            f"directory, e.g. {path / sorted(dataset)[0]}"
        )
    for index, row in enumerate(dataset):
        yield f"{path} row {index}", row


_READERS = {
    ".txt": _text,
    ".json": _json,
    ".jsonl": _json_lines,
    ".parquet": _parquet,
    ".arrow": _arrow,
}


# ------------------------------------------------------------------ helpers
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(
            f"dataset: {path} is not UTF-8 text (byte {error.start}: {error.reason}); expected "
            f"a UTF-8 {path.suffix or 'text'} file"
        ) from error


def _invalid_json(path: Path, error: json.JSONDecodeError) -> ValueError:
    return ValueError(
        f"dataset: {path} line {error.lineno} is not valid JSON ({error.msg} at column "
        f"{error.colno}); expected a list of records, or one record per line (JSON Lines)"
    )


def _record(value: Any, where: str) -> Any:
    if not isinstance(value, (dict, str)):
        raise TypeError(
            f"{where} is a JSON {type(value).__name__}; expected an object (a record with a "
            f"text column, 'messages' or 'input_ids') or a string (text)"
        )
    return value


def _import(name: str, path: Path) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs {name}: {DATA_EXTRA} (installs datasets and pyarrow)"
        ) from error
