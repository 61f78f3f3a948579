"""MLflow import on real on-disk layouts: run metadata read into lineage, bundles built from the
MLflow model, `models:/` references resolved by MLflow's own client (a real file store), and
the refusals: missing MLmodel, another run's directory, an unknown reference, MLflow absent."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from agent.contract.bundle import read_manifest
from fleet.errors import FleetInputError, FleetMisuseError, NotFound
from fleet.registry.builder import BundleMetadata
from fleet.registry.mlflow_import import build_mlflow_bundle, load_mlflow_model
from fleet.registry.mlflow_runs import download_models_uri, param_value, parse_models_uri, read_run_dir
from tests.support.mlflow_dirs import RUN_ID, mlruns_model, reference_rows


@pytest.mark.unit
def test_run_directory_found_from_the_model_gives_params_metrics_and_commit(tmp_path: Path) -> None:
    model_dir = mlruns_model(tmp_path, metadata="metadata:\n  hyperparameters: {lr: 0.5, batch: 64}\n"
                                                "  metrics: {acc: 0.1, f1: 0.7}\n")
    mm = load_mlflow_model(model_dir)
    lin = mm.lineage
    assert mm.digest == "sha256:" + hashlib.sha256((model_dir / "model.onnx").read_bytes()).hexdigest()
    # The run's own records win over the hand-written metadata block on a shared key.
    assert lin["hyperparameters"] == {"lr": 0.01, "epochs": 5, "optimizer": "adam", "batch": 64}
    assert lin["metrics"] == {"acc": 0.93, "loss": 0.2, "f1": 0.7}  # acc: the latest logged value
    assert lin["training_code_ref"] == "c0ffee1234"
    assert lin["source"]["run_id"] == RUN_ID and lin["source"]["run_name"] == "calm-owl"
    assert "mlflow.user" not in str(lin)  # only the tags that mean lineage are copied


@pytest.mark.unit
def test_a_model_outside_a_run_directory_imports_without_run_lineage(tmp_path: Path) -> None:
    model_dir = mlruns_model(tmp_path)
    loose = tmp_path / "loose"
    loose.mkdir()
    for name in ("MLmodel", "model.onnx"):
        (loose / name).write_bytes((model_dir / name).read_bytes())
    lin = load_mlflow_model(loose).lineage
    assert "hyperparameters" not in lin and lin["source"]["run_id"] == RUN_ID
    # ... unless the operator names the run directory.
    named = load_mlflow_model(loose, run_dir=model_dir.parents[1]).lineage
    assert named["metrics"]["acc"] == 0.93


@pytest.mark.unit
def test_bad_run_metadata_and_missing_mlmodel_are_refused(tmp_path: Path) -> None:
    model_dir = mlruns_model(tmp_path)
    other = mlruns_model(tmp_path / "other", run_id="0" * 32)
    with pytest.raises(FleetInputError, match=r"is run 0000.*names run 8c1f"):
        load_mlflow_model(model_dir, run_dir=other.parents[1])
    (model_dir.parents[1] / "metrics" / "acc").write_text("not a metric line\n")
    with pytest.raises(FleetInputError, match="metric 'acc'"):
        load_mlflow_model(model_dir)
    with pytest.raises(FleetInputError, match=r"no meta\.yaml"):
        read_run_dir(tmp_path)
    (model_dir / "MLmodel").unlink()
    with pytest.raises(FleetInputError, match="no MLmodel file"):
        load_mlflow_model(model_dir)


@pytest.mark.unit
def test_params_keep_their_logged_type_only_when_exact() -> None:
    assert [param_value(v) for v in ("5", "0.01", "1e-05", "True", "007", "adam", "1.50")] == \
        [5, 0.01, 1e-05, True, "007", "adam", "1.50"]


@pytest.mark.integration
def test_bundle_built_from_the_mlflow_model_ships_its_artifact_and_lineage(tmp_path: Path) -> None:
    mm = load_mlflow_model(mlruns_model(tmp_path))
    out = build_mlflow_bundle(mm, "clf", "1.2.0", tmp_path / "clf.efb", reference=reference_rows())
    manifest = read_manifest(out)
    assert (manifest.name, manifest.version, manifest.model_digest) == ("clf", "1.2.0", mm.digest)
    assert manifest.lineage.hyperparameters["lr"] == 0.01 and manifest.lineage.metrics["acc"] == 0.93
    assert manifest.lineage.training_code_ref == "c0ffee1234" and manifest.reference_profile.features
    with pytest.raises(FleetInputError, match="quantize"):
        build_mlflow_bundle(mm, "clf", "1.2.0", tmp_path / "q.efb", reference=reference_rows(),
                            base=BundleMetadata(name="x", version="0.0.1", quantize="dynamic"))
    with pytest.raises(FleetInputError, match="no reference data"):
        build_mlflow_bundle(mm, "clf", "1.2.0", tmp_path / "n.efb", reference=None)


@pytest.fixture
def mlflow_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A real MLflow tracking + registry file store with `models:/clf/1` logged by a run."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "tracking").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    source = mlruns_model(tmp_path / "src")
    client = MlflowClient(uri, uri)
    run = client.create_run(client.create_experiment("edge"))
    rid = run.info.run_id
    client.log_param(rid, "lr", "0.02")
    client.log_metric(rid, "acc", 0.91)
    client.set_tag(rid, "mlflow.source.git.commit", "feed42")
    (source / "MLmodel").write_text((source / "MLmodel").read_text().replace(RUN_ID, rid))
    client.log_artifacts(rid, str(source), "model")
    client.set_terminated(rid)
    client.create_registered_model("clf")
    client.create_model_version("clf", f"{run.info.artifact_uri}/model", run_id=rid)
    return rid


@pytest.mark.integration
def test_models_uri_is_resolved_by_mlflows_client(mlflow_registry: str, tmp_path: Path) -> None:
    local, run = download_models_uri("models:/clf/1", tmp_path / "dl")
    assert (local / "MLmodel").is_file() and run is not None and run.run_id == mlflow_registry
    lin = load_mlflow_model(local, run=run).lineage
    assert lin["hyperparameters"] == {"lr": 0.02} and lin["metrics"] == {"acc": 0.91}
    assert lin["training_code_ref"] == "feed42"
    with pytest.raises(NotFound, match="models:/nope/1"):
        download_models_uri("models:/nope/1", tmp_path / "dl2")
    with pytest.raises(NotFound, match="models:/clf/7"):
        download_models_uri("models:/clf/7", tmp_path / "dl3")
    with pytest.raises(FleetInputError, match="not a models:/"):
        parse_models_uri("models:/clf")


@pytest.mark.unit
def test_models_uri_without_mlflow_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("mlflow", "mlflow.artifacts", "mlflow.exceptions", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, name, None)  # `import mlflow` now fails as if not installed
    with pytest.raises(FleetMisuseError, match=r"pip install 'edgefleet\[mlflow\]'"):
        download_models_uri("models:/clf/1", tmp_path)
