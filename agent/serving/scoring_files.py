"""Batch readers and writers for offline scoring (`edgefleet agent predict`): .npy, .csv, .jsonl.

Files are streamed batch by batch (a memory-mapped .npy, CSV rows, JSON lines) so a file
larger than the device's memory can still be scored. Row numbers in error messages are
1-based data rows, so a user can find the offending line.

- `.npy`: one array, rows on axis 0; single-input models only (single-output for writing).
- `.csv`: one row per example, the input's values flattened; an optional header row (any
  non-numeric cell) is skipped; single-input models only. Output columns `<output>_<i>`.
- `.jsonl`: one JSON value per line: an object `{input_name: example}` or, for single-input
  models, the example itself (a list). Output lines `{output_name: example}`.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

import numpy as np

from agent.contract.manifest import Manifest
from agent.errors import InputValidationError, MisuseError

FORMATS = (".npy", ".csv", ".jsonl")


def file_format(path: Path) -> str:
    """The scoring format by suffix. Raises `MisuseError` for anything else."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise MisuseError(
            f"{path.name}: unsupported format {suffix or '(none)'}; use one of {', '.join(FORMATS)}"
        )
    return suffix


def check_output(path: Path) -> str:
    """The output's format, once its directory is known to take the file.

    Checked before the model loads and the first row is scored: a typo in `-o` must cost a
    one-line error, not a run (or a traceback from deep inside numpy at its first batch).
    Raises `MisuseError`.
    """
    fmt = file_format(path)
    parent = path.parent
    if path.is_dir():
        raise MisuseError(f"cannot write {path}: it is a directory")
    if not parent.is_dir():
        raise MisuseError(f"cannot write {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise MisuseError(f"cannot write {path}: directory {parent} is not writable")
    return fmt


def _single(specs: list[Any], kind: str, fmt: str) -> str:
    if len(specs) != 1:
        raise MisuseError(
            f"{fmt} files need a single-{kind[:-1]} model; this one has {len(specs)} {kind}: use .jsonl"
        )
    return str(specs[0].name)


def count_rows(path: Path) -> int:
    """Examples in an input file (for progress): npy rows, non-empty CSV/JSON lines (CSV header excluded)."""
    fmt = file_format(path)
    if fmt == ".npy":
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        return int(arr.shape[0]) if arr.ndim else 1
    with path.open("r", encoding="utf-8", newline="") as fh:
        lines = sum(1 for line in fh if line.strip())
    if fmt == ".csv" and lines:
        with path.open("r", encoding="utf-8", newline="") as fh:
            if _is_header(next(csv.reader(fh), [])):
                lines -= 1
    return lines


def _is_header(row: list[str]) -> bool:
    try:
        [float(cell) for cell in row]
    except ValueError:
        return True
    return False


def iter_batches(path: Path, manifest: Manifest, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(first_row, inputs)` batches of at most `batch_size` examples.

    Raises `MisuseError` for an unsupported file or model combination and
    `InputValidationError` for unparsable content (with the row number).
    """
    fmt = file_format(path)
    if fmt == ".npy":
        name = _single(manifest.inputs, "inputs", ".npy")
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise InputValidationError(f"{path.name}: not a valid .npy array ({exc})") from None
        if arr.ndim == 0:
            raise InputValidationError(f"{path.name}: a 0-d array has no rows")
        for start in range(0, arr.shape[0], batch_size):
            yield start + 1, {name: np.asarray(arr[start : start + batch_size])}
    elif fmt == ".csv":
        yield from _csv_batches(path, manifest, batch_size)
    else:
        yield from _jsonl_batches(path, manifest, batch_size)


def _csv_batches(path: Path, manifest: Manifest, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    name = _single(manifest.inputs, "inputs", ".csv")
    trailing = manifest.inputs[0].shape[1:]
    if any(d is None for d in trailing):
        raise MisuseError(
            f".csv needs fixed non-batch dimensions; input {name!r} has {manifest.inputs[0].shape}"
        )
    dims = [int(d) for d in trailing if d is not None]
    width = math.prod(dims)
    rows: list[list[float]] = []
    first, row_no = 1, 0
    with path.open("r", encoding="utf-8", newline="") as fh:
        for i, cells in enumerate(csv.reader(fh)):
            if not cells or not any(c.strip() for c in cells):
                continue
            if i == 0 and _is_header(cells):
                continue
            row_no += 1
            if len(cells) != width:
                raise InputValidationError(f"{path.name} row {row_no}: {len(cells)} values, expected {width}")
            try:
                rows.append([float(c) for c in cells])
            except ValueError as exc:
                raise InputValidationError(f"{path.name} row {row_no}: {exc}") from None
            if len(rows) == batch_size:
                yield first, {name: np.asarray(rows, dtype=np.float64).reshape(len(rows), *dims)}
                first, rows = row_no + 1, []
    if rows:
        yield first, {name: np.asarray(rows, dtype=np.float64).reshape(len(rows), *dims)}


def _jsonl_batches(path: Path, manifest: Manifest, batch_size: int) -> Iterator[tuple[int, dict[str, Any]]]:
    names = [spec.name for spec in manifest.inputs]
    columns: dict[str, list[Any]] = {n: [] for n in names}
    first, row_no = 1, 0
    with path.open("r", encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row_no += 1
            try:
                doc = json.loads(line)
            except ValueError as exc:
                raise InputValidationError(f"{path.name} row {row_no}: not valid JSON ({exc})") from None
            if not isinstance(doc, dict):
                if len(names) != 1:
                    raise InputValidationError(
                        f"{path.name} row {row_no}: expected an object with inputs {names}"
                    )
                doc = {names[0]: doc}
            if sorted(doc) != sorted(names):
                raise InputValidationError(
                    f"{path.name} row {row_no}: keys {sorted(doc)}, expected {sorted(names)}"
                )
            for n in names:
                columns[n].append(doc[n])
            if row_no - first + 1 == batch_size:
                yield first, dict(columns)
                first, columns = row_no + 1, {n: [] for n in names}
    if columns[names[0]]:
        yield first, dict(columns)


class OutputWriter:
    """Writes output batches to .npy/.csv/.jsonl through a temporary file renamed at `close`."""

    def __init__(self, path: Path, manifest: Manifest, total_rows: int) -> None:
        self.path = path
        self.fmt = file_format(path)
        self.names = [spec.name for spec in manifest.outputs]
        if self.fmt == ".npy":
            _single(manifest.outputs, "outputs", ".npy")
        self.total_rows = total_rows
        self.tmp = path.with_name(f".{path.name}.partial")
        self._rows = 0
        self._npy: np.memmap[Any, Any] | None = None
        self._text: TextIO | None = None
        self._csv: Any = None
        if self.fmt != ".npy":
            try:
                self._text = self.tmp.open("w", encoding="utf-8", newline="")
            except OSError as exc:
                raise MisuseError(f"cannot write {path}: {exc.strerror or exc}") from None

    def write(self, outputs: dict[str, np.ndarray]) -> None:
        """Append one batch of outputs (rows on axis 0). Raises `MisuseError` if it cannot."""
        try:
            self._write(outputs)
        except OSError as exc:  # the directory vanished, the disk is full, ...
            raise MisuseError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def _write(self, outputs: dict[str, np.ndarray]) -> None:
        rows = int(next(iter(outputs.values())).shape[0])
        if self.fmt == ".npy":
            arr = outputs[self.names[0]]
            if self._npy is None:
                self._npy = np.lib.format.open_memmap(
                    self.tmp, mode="w+", dtype=arr.dtype, shape=(self.total_rows, *arr.shape[1:])
                )
            self._npy[self._rows : self._rows + rows] = arr
        elif self.fmt == ".csv":
            assert self._text is not None
            flat = [outputs[n].reshape(rows, -1) for n in self.names]
            if self._csv is None:
                self._csv = csv.writer(self._text)
                self._csv.writerow(
                    [f"{n}_{j}" for n, f in zip(self.names, flat, strict=True) for j in range(f.shape[1])]
                )
            self._csv.writerows(np.concatenate(flat, axis=1).tolist())
        else:
            assert self._text is not None
            lists = {n: outputs[n].tolist() for n in self.names}
            for i in range(rows):
                self._text.write(json.dumps({n: lists[n][i] for n in self.names}) + "\n")
        self._rows += rows

    def close(self, keep: bool = True) -> None:
        """Finish: rename into place if `keep` and every row was written, else remove the temp file."""
        if self._text is not None:
            self._text.close()
        if self._npy is not None:
            self._npy.flush()
            del self._npy
            self._npy = None
        if keep and self._rows == self.total_rows:
            if self.fmt == ".npy" and self._rows == 0:
                raise MisuseError("no rows to write")
            try:
                self.tmp.replace(self.path)
            except OSError as exc:
                self.tmp.unlink(missing_ok=True)
                raise MisuseError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        else:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close(keep=et is None)
