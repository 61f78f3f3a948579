"""Offline scoring file formats: parsing, batching, row-numbered errors, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.contract.manifest import Manifest
from agent.errors import InputValidationError, MisuseError
from agent.serving.scoring_files import OutputWriter, check_output, count_rows, iter_batches
from simulators.models import mlp_manifest

MANIFEST = mlp_manifest(b"unused")
TWO_IN = Manifest.model_validate(
    {
        **MANIFEST.model_dump(mode="json"),
        "inputs": [
            {"name": "a", "dtype": "float32", "shape": [None, 2]},
            {"name": "b", "dtype": "int64", "shape": [None]},
        ],
        "outputs": [
            {"name": "p", "dtype": "float32", "shape": [None]},
            {"name": "q", "dtype": "float32", "shape": [None, 2]},
        ],
    }
)


@pytest.mark.integration
def test_jsonl_bare_lists_objects_and_batching(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text("[1, 2]\n\n[3, 4]\n[5, 6]\n")
    assert count_rows(path) == 3
    batches = list(iter_batches(path, MANIFEST, 2))
    assert [(first, inputs["x"]) for first, inputs in batches] == [(1, [[1, 2], [3, 4]]), (3, [[5, 6]])]
    two = tmp_path / "two.jsonl"
    two.write_text(json.dumps({"a": [1, 2], "b": 3}) + "\n" + json.dumps({"a": [1, 2]}) + "\n")
    with pytest.raises(InputValidationError, match=r"two.jsonl row 2: keys \['a'\], expected \['a', 'b'\]"):
        list(iter_batches(two, TWO_IN, 10))
    two.write_text("[1, 2]\n")
    with pytest.raises(InputValidationError, match="row 1: expected an object with inputs"):
        list(iter_batches(two, TWO_IN, 10))
    path.write_text("[1, 2]\n{oops\n")
    with pytest.raises(InputValidationError, match=r"in\.jsonl row 2: not valid JSON"):
        list(iter_batches(path, MANIFEST, 10))


@pytest.mark.integration
def test_csv_header_detection_and_bad_cells(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("a,b\n" + "\n".join(",".join(["1.5"] * 32) for _ in range(3)) + "\n")
    assert count_rows(path) == 3
    ((first, inputs),) = list(iter_batches(path, MANIFEST, 10))
    assert first == 1 and inputs["x"].shape == (3, 32)
    path.write_text(",".join(["1"] * 32) + "\n" + ",".join(["1"] * 31 + ["x"]) + "\n")
    assert count_rows(path) == 2  # a numeric first row is data, not a header
    with pytest.raises(InputValidationError, match=r"in\.csv row 2: could not convert string to float: 'x'"):
        list(iter_batches(path, MANIFEST, 10))
    with pytest.raises(MisuseError, match=r"\.csv files need a single-input model; this one has 2 inputs"):
        list(iter_batches(path, TWO_IN, 10))


@pytest.mark.integration
def test_writers_are_atomic_and_check_shapes(tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    with OutputWriter(out, TWO_IN, 2) as writer:
        writer.write({"p": np.array([1.0, 2.0]), "q": np.array([[3.0, 4.0], [5.0, 6.0]])})
    assert out.read_text().splitlines() == ["p_0,q_0,q_1", "1.0,3.0,4.0", "2.0,5.0,6.0"]
    with pytest.raises(MisuseError, match=r"\.npy files need a single-output model; this one has 2 outputs"):
        OutputWriter(tmp_path / "out.npy", TWO_IN, 2)
    failed = tmp_path / "failed.jsonl"
    with pytest.raises(RuntimeError), OutputWriter(failed, MANIFEST, 2) as writer:
        writer.write({"logits": np.zeros((1, 4))})
        raise RuntimeError("scoring stopped")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]
    short = OutputWriter(tmp_path / "short.npy", MANIFEST, 3)
    short.write({"logits": np.zeros((2, 4), dtype=np.float32)})
    short.close()  # fewer rows than announced: nothing is published
    assert not (tmp_path / "short.npy").exists()


@pytest.mark.unit
def test_unwritable_outputs_are_misuse_errors_not_os_errors(tmp_path: Path) -> None:
    with pytest.raises(MisuseError, match=r"directory .*missing does not exist"):
        check_output(tmp_path / "missing" / "out.npy")
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(MisuseError, match="it is a directory"):
        check_output(tmp_path / "dir.npy")
    assert check_output(tmp_path / "out.jsonl") == ".jsonl"
    with pytest.raises(MisuseError, match="cannot write"):  # the check passed, the directory went away
        OutputWriter(tmp_path / "gone" / "out.csv", MANIFEST, 1)
    writer = OutputWriter(tmp_path / "gone" / "out.npy", MANIFEST, 1)
    with pytest.raises(MisuseError, match="cannot write"):
        writer.write({"logits": np.zeros((1, 4), np.float32)})
