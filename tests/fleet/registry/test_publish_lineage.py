"""Publishing a bundle keeps everything its manifest says about lineage and quantization."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from agent.contract.bundle import write_bundle
from agent.contract.manifest import Lineage, Manifest, Quantization, TensorSpec
from fleet.access.auth import create_api_key
from fleet.api import create_app
from fleet.registry.publish import publish_bundle
from fleet.settings import FleetSettings
from fleet.store import Store
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository
from tests.support.fakes import FakeClock
from tests.support.postgres import Backend

MODEL = bytes(range(256)) * 4


@pytest.mark.integration
def test_hyperparameters_and_quantization_figures_reach_the_registry_and_the_api(
        tmp_path: Path, backend: Backend) -> None:
    settings = FleetSettings(data_dir=tmp_path, database_url=backend.pg_url)
    store = Store(settings.database, clock=FakeClock())
    repo = Repository(settings.repo_dir, KeyStore(settings.keys_dir))
    repo.init(root_threshold=1, root_keys=1)
    quant = Quantization(scheme="int8-static", accuracy_delta=0.012, agreement=0.98,
                         calibration={"rows": 256, "max_abs_delta": 0.03, "source": "reference"})
    lineage = Lineage(training_code_ref="git:1a2b3c", dataset_ref="s3://data/v3",
                      hyperparameters={"lr": 0.1, "epochs": 20, "optimizer": "adam"}, metrics={"auc": 0.91})
    manifest = Manifest(name="mlp", version="1.0.0", runtime="onnx", model_file="model.onnx",
                        model_digest="sha256:" + hashlib.sha256(MODEL).hexdigest(), model_size=len(MODEL),
                        inputs=[TensorSpec(name="x", dtype="float32", shape=[None, 32])],
                        outputs=[TensorSpec(name="probs", dtype="float32", shape=[None, 2])],
                        quantization=quant, lineage=lineage)
    bundle = write_bundle(manifest, MODEL, tmp_path / "mlp-1.0.0.efb")

    version = publish_bundle(store, repo, bundle, "mlp", "test")
    want_quant = {"scheme": "int8-static", "accuracy_delta": 0.012, "agreement": 0.98,
                  "calibration": {"rows": 256, "max_abs_delta": 0.03, "source": "reference"}}
    assert version.lineage["hyperparameters"] == {"lr": 0.1, "epochs": 20, "optimizer": "adam"}
    assert version.lineage["quantization"] == want_quant
    assert (version.lineage["metrics"], version.lineage["training_code_ref"]) == ({"auc": 0.91}, "git:1a2b3c")

    key = create_api_key(store, "v", "viewer", "test")[1]
    with TestClient(create_app(settings, store)) as client:
        shown = client.get("/v1/models/mlp/versions/1.0.0", headers={"Authorization": f"Bearer {key}"}).json()
    assert shown["lineage"]["hyperparameters"]["lr"] == 0.1
    assert shown["lineage"]["quantization"] == want_quant
    assert shown["lineage"]["dataset_ref"] == "s3://data/v3"
    store.close()
