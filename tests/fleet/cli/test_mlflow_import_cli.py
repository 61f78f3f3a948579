"""MLflow import leads to a deployable version, through the API and `edgefleet models import-mlflow`.

A real fleet (HTTP on loopback, TUF repository) and real on-disk MLflow layouts: the server-side
import either builds and publishes the bundle at once (reference data given) or registers the
version for a bundle to be attached later, whose model digest must be MLflow's artifact's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner, Result

from fleet.cli import models
from fleet.cli.api_client import EXIT_CONFLICT, EXIT_NOT_FOUND
from fleet.registry.builder import BundleMetadata, build_bundle
from simulators.models import make_mlp_onnx
from tests.support.mlflow_dirs import RUN_ID, SIZES, mlruns_model, reference_rows
from tests.support.running_fleet import RunningFleet, running_fleet


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[RunningFleet]:
    with running_fleet(tmp_path / "fleet") as f:
        yield f


def cli(*args: str, env: dict[str, str], code: int = 0) -> Result:
    result = CliRunner().invoke(models.group, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code == code, (args, result.output)
    return result


def post(fleet: RunningFleet, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{fleet.url}{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {fleet.keys['operator']}"})


def upload(fleet: RunningFleet, name: str, bundle: Path) -> httpx.Response:
    return httpx.post(f"{fleet.url}/v1/models/{name}/versions/upload", content=bundle.read_bytes(),
                      timeout=120, headers={"Authorization": f"Bearer {fleet.keys['operator']}",
                                            "Content-Type": "application/octet-stream"})


def plain_bundle(model: bytes, tmp_path: Path, version: str, name: str = "clf") -> Path:
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / f"m-{version}.onnx").write_bytes(model)
    return build_bundle(tmp_path / f"m-{version}.onnx", BundleMetadata(name=name, version=version),
                        tmp_path / f"{name}-{version}.efb", reference_data=reference_rows())


@pytest.mark.integration
def test_api_import_then_attach_a_bundle_with_the_same_artifact(fleet: RunningFleet, tmp_path: Path) -> None:
    model_dir = mlruns_model(fleet.settings.import_dir / "exp")
    rel = str(model_dir.relative_to(fleet.settings.import_dir))
    res = post(fleet, "/v1/models/import-mlflow", {"path": rel, "model": "clf", "version": "1.0.0"})
    assert res.status_code == 201, res.text
    imported = res.json()
    assert imported["bundle_target"] is None  # waiting for its bundle
    lineage = imported["lineage"]
    assert lineage["hyperparameters"]["lr"] == 0.01 and lineage["metrics"]["acc"] == 0.93
    # A bundle of another model for that version: refused, naming both digests.
    wrong = upload(fleet, "clf", plain_bundle(make_mlp_onnx(9, sizes=SIZES), tmp_path, "1.0.0"))
    assert wrong.status_code == 409 and "immutable" in wrong.text
    assert imported["artifact_digest"] in wrong.text
    # The bundle of MLflow's own artifact attaches; the version keeps MLflow's lineage.
    onnx = (model_dir / "model.onnx").read_bytes()
    right = upload(fleet, "clf", plain_bundle(onnx, tmp_path / "r", "1.0.0"))
    assert right.status_code == 201, right.text
    attached = right.json()
    assert attached["bundle_target"] == "models/clf/clf-1.0.0.efb"
    assert attached["lineage"] == imported["lineage"]
    assert (fleet.settings.repo_dir / "targets" / "models" / "clf").is_dir()  # published as a TUF target
    again = upload(fleet, "clf", plain_bundle(onnx, tmp_path / "a", "1.0.0"))
    assert again.status_code == 409 and "already exists" in again.text


@pytest.mark.integration
def test_api_import_with_reference_data_is_deployable_at_once(fleet: RunningFleet) -> None:
    imports = fleet.settings.import_dir
    model_dir = mlruns_model(imports / "exp")
    np.save(imports / "ref.npy", reference_rows())
    rel = str(model_dir.relative_to(imports))
    res = post(fleet, "/v1/models/import-mlflow",
               {"path": rel, "model": "clf", "version": "2.0.0", "reference_data": "ref.npy"})
    assert res.status_code == 201, res.text
    v = res.json()
    assert v["bundle_target"] == "models/clf/clf-2.0.0.efb"
    assert v["lineage"]["source"]["run_id"] == RUN_ID and v["lineage"]["source"]["bundle_sha256"]
    assert v["lineage"]["training_code_ref"] == "c0ffee1234"
    outside = post(fleet, "/v1/models/import-mlflow",
                   {"path": rel, "model": "clf", "version": "2.0.1", "reference_data": "../../etc/passwd"})
    assert outside.status_code == 422 and outside.json()["detail"][0]["loc"] == ["body", "reference_data"]
    (imports / "empty").mkdir()
    missing = post(fleet, "/v1/models/import-mlflow", {"path": "empty", "model": "clf", "version": "2.0.2"})
    assert missing.status_code == 422 and "no MLmodel" in missing.text


@pytest.mark.integration
def test_cli_import_mlflow_builds_registers_and_attaches(fleet: RunningFleet, tmp_path: Path) -> None:
    env = fleet.env()
    model_dir = mlruns_model(tmp_path / "local")
    np.save(tmp_path / "ref.npy", reference_rows())
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps({"feature_names": [f"s{i}" for i in range(SIZES[0])]}))
    out = cli("import-mlflow", str(model_dir), "--model", "clf", "--version", "1.0.0",
              "--reference-data", str(tmp_path / "ref.npy"), "--metadata", str(meta), env=env)
    assert out.stdout.strip() == "clf:1.0.0" and "models/clf/clf-1.0.0.efb" in out.stderr
    shown = json.loads(cli("show", "clf", "1.0.0", "--json", env=env).stdout)
    assert shown["bundle_target"] == "models/clf/clf-1.0.0.efb"
    assert shown["lineage"]["source"]["run_id"] == RUN_ID
    assert shown["lineage"]["hyperparameters"] == {"lr": 0.01, "epochs": 5, "optimizer": "adam"}
    # The same version again: refused (it has its bundle), one line, conflict exit code.
    again = cli("import-mlflow", str(model_dir), "--model", "clf", "--version", "1.0.0", "--no-profile",
                env=env, code=EXIT_CONFLICT)
    assert "cannot take this MLflow model" in again.stderr
    assert "--reference-data" in cli("import-mlflow", str(model_dir), "--model", "clf", "--version", "1.0.1",
                                     env=env, code=2).output
    (model_dir / "MLmodel").unlink()
    gone = cli("import-mlflow", str(model_dir), "--model", "clf", "--version", "1.0.2", "--no-profile",
               env=env, code=1)
    assert "no MLmodel file" in gone.stderr


@pytest.mark.integration
def test_cli_publish_attaches_a_bundle_to_a_server_side_import(fleet: RunningFleet, tmp_path: Path) -> None:
    model_dir = mlruns_model(fleet.settings.import_dir / "exp")
    rel = str(model_dir.relative_to(fleet.settings.import_dir))
    res = post(fleet, "/v1/models/import-mlflow", {"path": rel, "model": "clf", "version": "1.0.0"})
    assert res.status_code == 201
    bundle = plain_bundle((model_dir / "model.onnx").read_bytes(), tmp_path, "1.0.0")
    out = cli("publish", str(bundle), env=fleet.env())
    assert out.stdout.strip() == "clf:1.0.0" and "models/clf/clf-1.0.0.efb" in out.stderr


@pytest.mark.integration
def test_cli_import_from_a_models_uri(fleet: RunningFleet, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "tracking").as_uri()
    env = fleet.env(MLFLOW_ALLOW_FILE_STORE="true", MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri)
    for key in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(key, env[key])
    client = MlflowClient(uri, uri)
    run = client.create_run(client.create_experiment("edge"))
    source = mlruns_model(tmp_path / "src")
    (source / "MLmodel").write_text((source / "MLmodel").read_text().replace(RUN_ID, run.info.run_id))
    client.log_param(run.info.run_id, "lr", "0.03")
    client.log_artifacts(run.info.run_id, str(source), "model")
    client.create_registered_model("clf")
    client.create_model_version("clf", f"{run.info.artifact_uri}/model", run_id=run.info.run_id)
    out = cli("import-mlflow", "models:/clf/1", "--model", "clf", "--version", "3.0.0", "--no-profile",
              env=env)
    assert out.stdout.strip() == "clf:3.0.0" and "drift monitoring is OFF" in out.stderr
    shown = json.loads(cli("show", "clf", "3.0.0", "--json", env=env).stdout)
    assert shown["lineage"]["hyperparameters"] == {"lr": 0.03} and shown["bundle_target"]
    unknown = cli("import-mlflow", "models:/clf/9", "--model", "clf", "--version", "3.0.1", "--no-profile",
                  env=env, code=EXIT_NOT_FOUND)
    assert "MLflow has no models:/clf/9" in unknown.stderr


@pytest.mark.integration
def test_cli_models_uri_without_mlflow_says_which_extra(fleet: RunningFleet,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("mlflow", "mlflow.artifacts", "mlflow.exceptions", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)
    out = cli("import-mlflow", "models:/clf/1", "--model", "clf", "--version", "1.0.0", "--no-profile",
              env=fleet.env(), code=1)
    assert "pip install 'edgefleet[mlflow]'" in out.stderr
