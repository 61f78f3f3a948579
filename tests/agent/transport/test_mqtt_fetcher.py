"""MqttFetcher against a real Mosquitto and a real Publisher serving a repository directory."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError

from agent.contract.protocol import ReportedState, Topics, encode_reported
from agent.transport.mqtt_client import MqttTransport
from agent.transport.mqtt_config import MqttConfig
from agent.transport.mqtt_fetcher import FetcherConfig, MqttFetcher
from fleet.delivery.publisher import Publisher, PublisherSettings
from tests.support.broker import Broker, start_mosquitto

SIZE = 3 * 1024 * 1024 + 12345  # multi-MiB, not a multiple of the chunk size
TARGET = "targets/models/0f0f.model.efb"


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def repo(tmp_path: Path, payload: bytes) -> Path:
    root = tmp_path / "repo"
    (root / "targets" / "models").mkdir(parents=True)
    (root / "metadata").mkdir()
    (root / TARGET).write_bytes(payload)
    (root / "metadata" / "1.root.json").write_text('{"signed": {}}')
    return root


@contextmanager
def running(broker: Broker, repo: Path, settings: PublisherSettings | None = None) -> Iterator[Publisher]:
    pub = Publisher(
        MqttConfig(port=broker.port, client_id=f"pub-{uuid.uuid4().hex[:8]}"),
        PREFIX,
        repo,
        settings or PublisherSettings(),
    )
    pub.start()
    try:
        yield pub
    finally:
        pub.stop()


@contextmanager
def device(
    broker: Broker, dev: str, spool: Path, config: FetcherConfig | None = None
) -> Iterator[MqttFetcher]:
    transport = MqttTransport(MqttConfig(port=broker.port, client_id=dev, reconnect_max_s=1.0))
    transport.connect()
    try:
        yield MqttFetcher(transport, Topics(PREFIX, dev), spool, config)
    finally:
        transport.close()


PREFIX = "ef-test"


def _dev() -> str:
    return f"dev-{uuid.uuid4().hex[:8]}"


@pytest.mark.integration
def test_byte_exact_multi_mib_fetch(mosquitto: Broker, repo: Path, payload: bytes, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with running(mosquitto, repo) as pub, device(mosquitto, _dev(), spool) as fetcher:
        got = fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        n = math.ceil(SIZE / fetcher.config.chunk_size)
        assert fetcher.chunk_requests == n
        assert len(pub.request_log) == n
    assert list(spool.iterdir()) == []  # spool and resume files are gone once TUF has the bytes


@pytest.mark.integration
def test_missing_object_is_http_404(mosquitto: Broker, repo: Path, tmp_path: Path) -> None:
    with running(mosquitto, repo), device(mosquitto, _dev(), tmp_path / "s") as fetcher:
        with pytest.raises(DownloadHTTPError) as err:
            fetcher.download_bytes("mqtt://repo/metadata/2.root.json", 100_000)
        assert err.value.status_code == 404
        assert list((tmp_path / "s").iterdir()) == []  # nothing left to resume
        assert fetcher.download_bytes("mqtt://repo/metadata/1.root.json", 100) == b'{"signed": {}}'
        with pytest.raises(DownloadError):
            fetcher.download_bytes("https://example.org/metadata/1.root.json", 100)


@pytest.mark.integration
def test_symlink_out_of_the_repo_is_404(mosquitto: Broker, repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private key material")
    (repo / "targets" / "models" / "leak.txt").symlink_to(secret)
    with running(mosquitto, repo), device(mosquitto, _dev(), tmp_path / "s") as fetcher:
        with pytest.raises(DownloadHTTPError) as err:
            fetcher.download_bytes("mqtt://repo/targets/models/leak.txt", 1000)
        assert err.value.status_code == 404


@pytest.mark.integration
def test_over_limit_is_refused_before_downloading(mosquitto: Broker, repo: Path, tmp_path: Path) -> None:
    cfg = FetcherConfig(max_object_bytes=1024 * 1024)
    with running(mosquitto, repo), device(mosquitto, _dev(), tmp_path / "s", cfg) as fetcher:
        with pytest.raises(DownloadLengthMismatchError):
            fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
        assert fetcher.chunk_requests == 1
    with running(mosquitto, repo), device(mosquitto, _dev(), tmp_path / "s2") as fetcher:
        with pytest.raises(DownloadLengthMismatchError):  # TUF's own max_length (endless data)
            fetcher.download_bytes(f"mqtt://repo/{TARGET}", 1000)
        assert fetcher.chunk_requests == 1


@pytest.mark.integration
def test_duplicated_chunks_are_tolerated(
    mosquitto: Broker, repo: Path, payload: bytes, tmp_path: Path
) -> None:
    """A second client re-publishes every chunk (same correlation data): each arrives twice."""
    dev = _dev()
    topic = Topics(PREFIX, dev).responses()
    copies: list[int] = []
    dup = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"dup-{dev}", protocol=paho.MQTTv5)

    def echo(client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        copies.append(len(msg.payload))
        # Late copies also arrive out of order with the newer chunks of the window.
        threading.Timer(0.03, client.publish, (msg.topic, msg.payload, 1, False, msg.properties)).start()

    dup.on_message = echo
    dup.connect(mosquitto.host, mosquitto.port)
    dup.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True))
    dup.loop_start()
    try:
        time.sleep(0.3)
        with running(mosquitto, repo), device(mosquitto, dev, tmp_path / "s") as fetcher:
            got = fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
            assert got == payload
            n = math.ceil(SIZE / fetcher.config.chunk_size)
            assert fetcher.chunk_requests == n  # duplicates caused no extra requests
            # every chunk reached the device twice (some copies after the fetch was done)
            _wait_for(lambda: fetcher.transport.messages_in >= 2 * n, 10)  # type: ignore[attr-defined]
            assert len(copies) >= n
    finally:
        dup.loop_stop()
        dup.disconnect()


@pytest.mark.integration
def test_per_device_flow_control_answers_429_and_fetch_completes(
    mosquitto: Broker, repo: Path, payload: bytes, tmp_path: Path
) -> None:
    settings = PublisherSettings(max_pending_per_device=2, bytes_per_s=8 * 1024 * 1024)
    cfg = FetcherConfig(window=8, chunk_size=32 * 1024, busy_backoff_s=0.02)
    with running(mosquitto, repo, settings) as pub, device(mosquitto, _dev(), tmp_path / "s", cfg) as fetcher:
        assert fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE) == payload
        assert pub.refused[429] > 0


def _resume_done(spool: Path) -> set[int]:
    files = list(spool.glob("*.resume.json"))
    return set(json.loads(files[0].read_text())["done"]) if files else set()


def _wait_for(cond: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


@pytest.mark.integration
def test_resume_across_broker_restart_without_refetching(repo: Path, payload: bytes, tmp_path: Path) -> None:
    broker = start_mosquitto(tmp_path / "broker")
    spool = tmp_path / "spool"
    chunk = 32 * 1024
    cfg = FetcherConfig(chunk_size=chunk, chunk_timeout_s=1.0, window=4)
    settings = PublisherSettings(bytes_per_s=1024 * 1024, burst_bytes=256 * 1024)
    result: dict[str, bytes | BaseException] = {}
    try:
        with running(broker, repo, settings) as pub, device(broker, _dev(), spool, cfg) as fetcher:

            def run() -> None:
                try:
                    result["data"] = fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
                except BaseException as exc:
                    result["error"] = exc

            worker = threading.Thread(target=run)
            worker.start()
            _wait_for(lambda: len(_resume_done(spool)) >= 20)
            done_before = _resume_done(spool)
            served_before = len(pub.request_log)
            broker.restart()
            worker.join(timeout=120)
            assert "error" not in result, result.get("error")
            assert result["data"] == payload
            later = {off // chunk for _d, _p, off in list(pub.request_log)[served_before:]}
            assert later, "the transfer went on after the restart"
            assert later.isdisjoint(done_before), "completed chunks were fetched again"
            assert fetcher.transport.connects >= 2  # type: ignore[attr-defined]
    finally:
        broker.stop()


@pytest.mark.integration
def test_resume_after_crash_continues_from_resume_file(repo: Path, payload: bytes, tmp_path: Path) -> None:
    """First fetcher dies with the broker gone; a new one (new process in real life) resumes."""
    broker = start_mosquitto(tmp_path / "broker")
    spool = tmp_path / "spool"
    chunk = 32 * 1024
    dev = _dev()
    settings = PublisherSettings(bytes_per_s=1024 * 1024, burst_bytes=256 * 1024)
    try:
        with running(broker, repo, settings) as pub:
            cfg = FetcherConfig(chunk_size=chunk, chunk_timeout_s=0.5, reconnect_wait_s=1.0, chunk_retries=0)
            errors: list[BaseException] = []
            with device(broker, dev, spool, cfg) as first:

                def run() -> None:
                    try:
                        first.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
                    except BaseException as exc:
                        errors.append(exc)

                worker = threading.Thread(target=run)
                worker.start()
                _wait_for(lambda: len(_resume_done(spool)) >= 20)
                broker.stop()
                worker.join(timeout=60)
                assert errors and isinstance(errors[0], DownloadError)
            done_before = _resume_done(spool)
            assert 20 <= len(done_before) < math.ceil(SIZE / chunk)
            broker.restart()
            assert pub.transport.wait_connected(30)  # type: ignore[attr-defined]
            served_before = len(pub.request_log)
            with device(broker, dev, spool, FetcherConfig(chunk_size=chunk)) as second:
                assert second.download_bytes(f"mqtt://repo/{TARGET}", SIZE) == payload
                later = {off // chunk for _d, _p, off in list(pub.request_log)[served_before:]}
                missing = set(range(math.ceil(SIZE / chunk))) - done_before
                assert later == missing  # exactly the unfinished chunks, none of the finished ones
    finally:
        broker.stop()


@pytest.mark.integration
def test_changed_object_restarts_instead_of_mixing(repo: Path, payload: bytes, tmp_path: Path) -> None:
    """A resume file for an older version of the object (other etag) is discarded."""
    spool = tmp_path / "spool"
    broker = start_mosquitto(tmp_path / "broker")
    try:
        with running(broker, repo) as pub, device(broker, _dev(), spool) as fetcher:
            key = hashlib.sha256(TARGET.encode()).hexdigest()[:40]
            (spool / f"{key}.part").write_bytes(b"\0" * SIZE)
            stale = {
                "path": TARGET,
                "etag": "old",
                "total_length": SIZE,
                "chunk_size": 65536,
                "done": [1, 2, 3],
            }
            (spool / f"{key}.resume.json").write_text(json.dumps(stale))
            assert fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE) == payload
            assert len(pub.request_log) >= math.ceil(SIZE / 65536)
    finally:
        broker.stop()


@pytest.mark.integration
def test_reported_state_uses_topic_device_id(mosquitto: Broker, repo: Path, tmp_path: Path) -> None:
    got: list[tuple[str, ReportedState]] = []
    pub = Publisher(MqttConfig(port=mosquitto.port, client_id="pub-reports"), PREFIX, repo)
    pub.on_reported(lambda dev, st: got.append((dev, st)))
    pub.start()
    dev = _dev()
    t = MqttTransport(MqttConfig(port=mosquitto.port, client_id=dev))
    t.connect()
    try:
        topics = Topics(PREFIX, dev)
        t.publish(topics.reported(), encode_reported(ReportedState(device_id="someone-else", timestamp=1.0)))
        t.publish(topics.reported(), encode_reported(ReportedState(state="committed", timestamp=2.0)))
        _wait_for(lambda: len(got) >= 1, 10)
        time.sleep(0.2)
        assert [(d, s.state) for d, s in got] == [(dev, "committed")]
        t.publish(topics.reported(), b"", retain=True)
    finally:
        t.close()
        pub.stop()


@pytest.mark.integration
def test_end_to_end_tuf_updater_over_mqtt(mosquitto: Broker, tmp_path: Path, payload: bytes) -> None:
    """python-tuf's Updater (through the agent's TrustClient) refreshes and downloads over MQTT."""
    from agent.trust.client import TrustClient
    from fleet.trust.keys import KeyStore
    from fleet.trust.repository import Repository

    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    bundle = tmp_path / "m.efb"
    bundle.write_bytes(payload)
    repo.add_target(bundle, "models/m.efb")
    with running(mosquitto, repo.repo_dir) as pub, device(mosquitto, _dev(), tmp_path / "spool") as fetcher:
        client = TrustClient(
            tmp_path / "trusted",
            tmp_path / "targets",
            fetcher,
            "mqtt://repo/metadata/",
            "mqtt://repo/targets/",
            bootstrap_root=repo.root_bytes(),
        )
        path = client.download_target("models/m.efb")
        assert path.read_bytes() == payload
        asked = {p for _d, p, _o in pub.request_log}
        assert "metadata/2.root.json" in asked  # root rotation probe ended with a 404
        assert "metadata/timestamp.json" in asked
        # A root rotation travels the same way: 2.root.json now exists, 3.root.json is a 404.
        assert repo.rotate_root() == 2
        client.refresh()
        assert client.trusted_root().version == 2
        assert "metadata/3.root.json" in {p for _d, p, _o in pub.request_log}


@pytest.mark.integration
def test_publisher_answers_400_to_a_malformed_request(mosquitto: Broker, repo: Path) -> None:
    from agent.contract.protocol import decode_chunk

    dev = _dev()
    topics = Topics(PREFIX, dev)
    with running(mosquitto, repo) as pub:
        t = MqttTransport(MqttConfig(port=mosquitto.port, client_id=dev))
        t.connect()
        try:
            answer = t.request(
                topics.requests(),
                b'{"schema_version": 1, "path": "../../etc/passwd"}',
                response_topic=topics.responses(),
                timeout=5,
            )
            header, payload = decode_chunk(answer.payload)
            assert header.status == 400 and payload == b"" and "ObjectRequest" in header.reason
            assert pub.refused[400] == 1
            assert pub.request_log == type(pub.request_log)()  # nothing was served
        finally:
            t.close()


@pytest.mark.integration
def test_retained_desired_reaches_a_device_that_subscribes_later(mosquitto: Broker, repo: Path) -> None:
    dev = _dev()
    topics = Topics(PREFIX, dev)
    with running(mosquitto, repo) as pub:
        assert pub.publish_desired(device_id=dev, document=b"signed-director-doc") == topics.desired()
        with pytest.raises(Exception, match="exactly one"):
            pub.publish_desired(device_id=dev, cohort="eu", document=b"x")
        got: list[bytes] = []
        t = MqttTransport(MqttConfig(port=mosquitto.port, client_id=dev))
        t.subscribe(topics.desired(), lambda m: got.append(m.payload))
        t.connect()
        try:
            _wait_for(lambda: bool(got), 10)
            assert got == [b"signed-director-doc"]
        finally:
            t.close()
            pub.publish_desired(device_id=dev, document=b"")


@pytest.mark.integration
def test_second_process_on_the_same_spool_is_refused(mosquitto: Broker, repo: Path, tmp_path: Path) -> None:
    import fcntl

    spool = tmp_path / "spool"
    with running(mosquitto, repo), device(mosquitto, _dev(), spool) as fetcher:
        key = hashlib.sha256(TARGET.encode()).hexdigest()[:40]
        with (spool / f"{key}.lock").open("w") as held:
            fcntl.flock(held, fcntl.LOCK_EX)
            with pytest.raises(DownloadError, match="another process"):
                fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
        assert fetcher.chunk_requests == 0


@pytest.mark.integration
def test_slow_telemetry_ingest_never_delays_chunk_answers(
    mosquitto: Broker, repo: Path, tmp_path: Path
) -> None:
    """Device -> fleet callbacks run off the MQTT network thread: a stuck ingest (a long SQLite
    write, a thousand reports at once) must not hold back the chunks devices are waiting for."""
    release = threading.Event()
    seen: list[bytes] = []

    def stuck_ingest(device_id: str, data: bytes) -> None:
        release.wait(60)
        seen.append(data)

    pub = Publisher(MqttConfig(port=mosquitto.port, client_id=f"pub-{uuid.uuid4().hex[:8]}"), PREFIX, repo)
    pub.on_telemetry(stuck_ingest)
    pub.start()
    dev = _dev()
    cfg = FetcherConfig(chunk_timeout_s=2.0, chunk_retries=1)
    try:
        with device(mosquitto, dev, tmp_path / "s", cfg) as fetcher:
            topic = Topics(PREFIX, dev).telemetry()
            for i in range(5):
                fetcher.transport.publish(topic, b"report-%d" % i, qos=1)
            deadline = time.monotonic() + 30
            while pub.inbound.pending() < 4 and time.monotonic() < deadline:  # 1 stuck, 4 queued
                time.sleep(0.01)
            assert fetcher.download_bytes("mqtt://repo/metadata/1.root.json", 100) == b'{"signed": {}}'
            assert seen == []  # the answer came while the ingest was still stuck
            release.set()
            while len(seen) < 5 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert seen == [b"report-%d" % i for i in range(5)]  # all of them, in arrival order
    finally:
        release.set()
        pub.stop()


@pytest.mark.integration
def test_a_full_disk_frees_the_spool_instead_of_keeping_it_for_a_resume(
    mosquitto: Broker, repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spool kept for a resume would keep the disk full (and the agent could not even record
    the failure): on ENOSPC the fetcher deletes it and fails with a clear reason."""
    import errno

    import agent.transport.mqtt_fetcher as fetcher_module

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    spool = tmp_path / "spool"
    with running(mosquitto, repo), device(mosquitto, _dev(), spool) as fetcher:
        monkeypatch.setattr(fetcher_module.os, "pwrite", full)
        with pytest.raises(DownloadError, match="disk full"):
            fetcher.download_bytes(f"mqtt://repo/{TARGET}", SIZE)
        monkeypatch.undo()
        assert [p.name for p in spool.iterdir()] == []  # nothing left to fill the disk
