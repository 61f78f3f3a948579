"""The daemon's serving path (holder, telemetry tap, one prediction id per row) behind a Unix
server with micro-batching on, reached through shared memory by concurrent clients: stacked
runs must give each client its own outputs and ids, every id must later meet a label for its
own prediction, and the interval must count every request once."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from agent.contract.telemetry_codec import decode_report
from agent.daemon.served_model import ServedModel
from agent.daemon.serving import ModelCatalog, TelemetryTap
from agent.inference_client import InferenceClient
from agent.serving import shm_layout
from agent.serving.api import ApiLimits
from agent.serving.batch_run import BatchConfig
from agent.serving.model_holder import ModelHolder
from agent.serving.shm_server import ShmConfig
from agent.serving.unix_server import UnixInferenceServer
from agent.telemetry.queue import ReportQueue
from simulators.models import mlp_reference, mlp_weights
from tests.support.serving_wire import classifier_mlp_manifest, mlp_file, socket_dir

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not shm_layout.supported(), reason="shared memory is x86-64 Linux only")]

CLIENTS, CALLS = 6, 40


def test_stacked_requests_on_the_daemons_path_keep_their_ids_labels_and_counts() -> None:
    with socket_dir("ef-stk-") as d:
        path, _ = mlp_file(d)
        manifest = classifier_mlp_manifest("1.0.0")
        catalog, holder = ModelCatalog(threads=1), ModelHolder()
        holder.swap(catalog.load(path, manifest, 1), manifest.bundle_id, keep_previous=False)
        queue = ReportQueue(d / "t.sqlite")
        tap = TelemetryTap(queue, catalog, "dev", "c")
        served = ServedModel(holder, catalog, tap)
        srv = UnixInferenceServer(served, d / "s.sock", ApiLimits(max_connections=16), feedback=tap,
                                  batching=BatchConfig(), shm=ShmConfig(spin_us=200, same_process=True))
        x = np.random.default_rng(9).standard_normal((CLIENTS * CALLS, 32)).astype(np.float32)
        ref = mlp_reference(x, mlp_weights(0))
        got: dict[int, list[tuple[str, int]]] = {}
        errors: list[BaseException] = []
        start = threading.Barrier(CLIENTS)

        def client(i: int) -> None:
            try:
                with InferenceClient(srv.path, shm_spin_us=0) as c:
                    start.wait()
                    mine = []
                    for k in range(CALLS):
                        row = i * CALLS + k
                        out = c.predict({"x": x[row:row + 1]})["logits"]
                        np.testing.assert_allclose(out, ref[row:row + 1], atol=1e-5)
                        (pid,) = c.last_prediction_ids
                        mine.append((pid, int(ref[row].argmax())))
                    assert c.on_shared_memory  # opened by the first predict
                    got[i] = mine
            except BaseException as exc:  # reported below: a thread's failure would be lost
                errors.append(exc)

        with srv:
            threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=60)
            assert not errors, errors
            assert srv.shm is not None and srv.shm.poller.stacked_runs >= 1
            issued = [p for mine in got.values() for p in mine]
            assert len({pid for pid, _ in issued}) == CLIENTS * CALLS  # every id its own
            with InferenceClient(srv.path, transport="socket") as c:  # labels: each row's own class
                counts = c.feedback(dict(issued))
        assert counts["matched"] == CLIENTS * CALLS and counts["unknown"] == counts["expired"] == 0
        tap.flush(None)
        (report,) = [decode_report(body) for _, body in queue.pending()]
        assert report.requests == CLIENTS * CALLS and report.errors == 0
        perf = report.performance
        assert perf is not None and perf.labelled == CLIENTS * CALLS
        assert int(np.trace(perf.confusion)) == CLIENTS * CALLS  # each label met its own row
        queue.close()
