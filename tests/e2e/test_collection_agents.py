"""Opt-in data collection end to end: the real fleet service (API, publisher, controller role
with the collection driver, dataset ingest) over SQLite, a private Mosquitto, real agents.

An operator asks the devices labelled `site=lab` that run mlp 1.0.0 for a sample; the driver
signs the policy into their director documents; the agent samples what it serves, uploads the
sample in chunks on its own dataset topic, each signed by its report key; the fleet checks the
signature, admits them under the policy and records a dataset version, exported as `.npz`. A
device outside the selector collects nothing, and a chunk on its topic is refused (unsigned:
by the report gate; signed by that device: by the policy check).
"""

from __future__ import annotations

import io
import json
import signal
from collections.abc import Iterator

import numpy as np
import paho.mqtt.client as paho
import pytest

from agent.contract.collect import DatasetChunk, encode_chunk
from agent.contract.protocol import Topics
from agent.serving.client import UnixInferenceClient
from fleet.collection.ingest import DatasetIngest
from fleet.delivery.report_verify import ReportVerifier
from tests.support.agent_world import Agent, wait_until
from tests.support.lifecycle_world import X
from tests.support.service_world import ServiceWorld

pytestmark = pytest.mark.integration
IN, OUT = "gw-in", "gw-out"
PREFIX = "ef-col"


class World(ServiceWorld[Agent]):
    """The fleet service, its broker and two agents: `IN` (site=lab) and `OUT` (site=other)."""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    w = World.open(tmp_path_factory.mktemp("collection-agents"), PREFIX, {"1.0.0": (1, 1)},
                   {"probation_requests": 0, "probation_seconds": 0.3, "inference_timeout_s": 2.0,
                    "traffic": "none"}, Agent)
    w.register_bundle("1.0.0")
    for d, site in ((IN, "lab"), (OUT, "other")):
        w.add_agent(d, {"site": site}, agent_labels={})
    try:
        with w.api as c:
            res = c.post("/v1/rollouts", json={"model_version_id": "mlp:1.0.0", "selector": "",
                                               "strategy": {"kind": "all_at_once", "bake_s": 0}})
        assert res.status_code == 201, res.text
        for d in (IN, OUT):
            wait_until(lambda: w.serving(d) == "mlp-1.0.0", 60, f"{d} serving\n{w.agents[d].tail()}")  # noqa: B023
        yield w
    finally:
        w.close()


def _answers(agent: Agent) -> bool:
    try:
        agent.predict_unix()
    except Exception:
        return False
    return True


def _ingest(world: World) -> DatasetIngest:
    return next(c for c in world.service.components if isinstance(c, DatasetIngest))


def test_a_signed_policy_brings_a_bounded_sample_back_as_a_dataset_version(world: World) -> None:
    with world.api as c:
        assert c.post("/v1/collections", json={"model": "mlp", "version": "9.9.9"}).status_code == 404
        assert c.post("/v1/collections", json={"model": "mlp", "version": "1.0.0", "max_rows": 0}
                      ).status_code == 422
        res = c.post("/v1/collections", json={"model": "mlp", "version": "1.0.0", "selector": "site=lab",
                                               "max_rows": 20, "max_seconds": 3, "chunk_bytes": 1024})
        assert res.status_code == 201, res.text
        cid = res.json()["collection_id"]

        def collecting() -> bool:
            got = c.get(f"/v1/collections/{cid}").json()
            return got["applied"] == "collecting"

        wait_until(collecting, 20, "the driver signed the policy out")
        assert c.get(f"/v1/collections/{cid}").json()["devices"] == [IN]
        agent_in, agent_out = world.agents[IN], world.agents[OUT]
        wait_until(lambda: (agent_in.state_dir / "collect" / "active.json").exists(), 20,
                   f"{IN} accepted the policy\n{agent_in.tail()}")
        client_in = UnixInferenceClient(agent_in.socket, timeout=5.0)
        ids: list[str] = []
        served: dict[tuple[float, ...], int] = {}
        for _ in range(6):  # 48 rows served, at most 20 kept
            logits = np.asarray(client_in.predict({"x": X})["logits"])
            ids += client_in.last_prediction_ids
            served.update({tuple(np.float64(r).tolist()): int(k)
                           for r, k in zip(X, logits.argmax(1), strict=True)})
            agent_out.predict_unix()
        classes = [int(k) for k in np.asarray(client_in.predict({"x": X})["logits"]).argmax(1)]
        ids_now = client_in.last_prediction_ids
        # the application labels every row it was served while the sample is still held
        labels = {pid: classes[i % len(classes)] for i, pid in enumerate(ids)}
        labels |= dict(zip(ids_now, classes, strict=True))
        assert client_in.feedback(labels)["matched"] == len(labels)
        client_in.close()

        def versions() -> list[dict[str, object]]:
            found: list[dict[str, object]] = c.get("/v1/datasets", params={"collection": cid}).json()
            return found

        found = wait_until(versions, 30, f"a dataset version\n{agent_in.tail()}")
        assert len(found) == 1
        v = found[0]
        assert (v["device_id"], v["policy_id"], v["rows"], v["columns"]) == (IN, cid, 20, X.shape[1])
        assert v["provenance"]["seen"] >= 20  # type: ignore[index]
        data = c.get(f"/v1/datasets/{v['dataset_id']}/export").content
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            assert z["x"].shape == (20, X.shape[1])
            assert json.loads(bytes(z["meta"]))["device_id"] == IN
            kept, got = z["x"], z["labels"]
        assert v["labelled"] == 20  # every kept row was labelled before the sample closed
        assert [int(g) for g in got] == [served[tuple(np.float64(r).tolist())] for r in kept]
        assert c.get("/v1/datasets/nope/export").status_code == 404
        done = agent_in.state_dir / "collect" / "active.json"  # marked once the broker acked the last chunk
        wait_until(lambda: json.loads(done.read_bytes())["phase"] == "done", 20, "the upload marked done")
        assert not (agent_out.state_dir / "collect").exists()  # no policy: nothing collected

        # a chunk on the other device's own topic, claiming the policy, is refused: unsigned (or
        # malformed) by the report gate; signed by that device's own key, by the policy check
        ingest = _ingest(world)
        before = ingest.counters["rejected"]
        gate = ingest.gate
        assert isinstance(gate, ReportVerifier) and gate.refused()[("dataset", "unsigned")] == 0
        chunk = encode_chunk(DatasetChunk(cid, OUT, "0" * 16, 0, 1, "0" * 64, b"x" * 10))
        client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="intruder",
                             protocol=paho.MQTTv5)
        client.connect(world.broker.host, world.broker.port)
        client.loop_start()
        client.publish(Topics(PREFIX).dataset(OUT), chunk, qos=1).wait_for_publish(5)
        client.publish(Topics(PREFIX).dataset(OUT), b"\xff not cbor", qos=1).wait_for_publish(5)
        signed = world.device_keys[OUT].paho_properties("dataset", chunk)  # OUT is not among the policy's
        client.publish(Topics(PREFIX).dataset(OUT), chunk, qos=1, properties=signed).wait_for_publish(5)
        client.loop_stop()
        client.disconnect()
        wait_until(lambda: ingest.counters["rejected"] == before + 3, 10, "three refusals")
        assert gate.refused()[("dataset", "unsigned")] == 2
        assert ingest.counters["reasons"]["no_policy"] == 1  # type: ignore[index]
        assert ingest.counters["reasons"]["report_auth"] == 2  # type: ignore[index]
        assert gate.refused()[("dataset", "bad_signature")] == 0  # the agent's own chunks all passed

        stopped = c.delete(f"/v1/collections/{cid}")
        assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
        wait_until(lambda: c.get(f"/v1/collections/{cid}").json()["applied"] == "stopped", 20, "withdrawn")
        actions = [e["action"] for e in c.get("/v1/audit").json()["items"]]
        assert "collection.create" in actions and "collection.stop" in actions


@pytest.mark.slow  # kill -9 and restart: the long step (see pyproject's markers)
def test_an_agent_killed_while_sampling_resumes_the_collection_after_restart(world: World) -> None:
    agent = world.agents[IN]
    with world.api as c:
        res = c.post("/v1/collections", json={"model": "mlp", "version": "1.0.0", "selector": "site=lab",
                                               "max_rows": 5, "max_seconds": 8, "strategy": "low_confidence"})
        assert res.status_code == 201, res.text
        cid = res.json()["collection_id"]
        active = agent.state_dir / "collect" / "active.json"

        def armed() -> bool:
            return active.exists() and json.loads(active.read_bytes())["policy"]["policy_id"] == cid

        wait_until(armed, 20, f"{IN} accepted the second policy\n{agent.tail()}")
        agent.predict_unix()
        agent.stop(signal.SIGKILL)  # mid-sampling: the phase and start time are on disk
        assert json.loads(active.read_bytes())["phase"] == "collecting"
        agent.start()
        wait_until(lambda: _answers(agent), 20, f"{IN} serving again\n{agent.tail()}")
        for _ in range(3):
            agent.predict_unix()

        def versions() -> list[dict[str, object]]:
            found: list[dict[str, object]] = c.get("/v1/datasets", params={"collection": cid}).json()
            return found

        found = wait_until(versions, 30, f"a dataset version after the restart\n{agent.tail()}")
        assert found[0]["rows"] == 5
        assert found[0]["provenance"]["strategy"] == "low_confidence"  # type: ignore[index]
        wait_until(lambda: json.loads(active.read_bytes())["phase"] == "done", 20, "the upload marked done")
