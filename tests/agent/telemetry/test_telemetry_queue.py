"""Store-and-forward: order, acks, bounded size with merging/dropping, counted loss, restarts."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.contract.telemetry import NumericSketch, TelemetryReport
from agent.contract.telemetry_codec import decode_report
from agent.errors import MisuseError
from agent.telemetry import QueueConfig, ReportQueue


def _rep(seq: int, version: str = "1.0.0", count: int = 1) -> TelemetryReport:
    counts = np.zeros(12, dtype=np.int64)
    counts[seq % 12] = count
    return TelemetryReport("dev-1", seq, "m", version, float(seq), float(seq + 1),
                           [NumericSketch(counts, 0, 0.0, 1.0, 1.0, 1.0)], [], requests=count)


@pytest.mark.integration
def test_reports_are_sent_in_order_and_removed_on_ack(tmp_path: Path) -> None:
    with ReportQueue(tmp_path / "q.db") as q:
        for s in range(5):
            q.put(_rep(s))
        assert [s for s, _ in q.pending()] == [0, 1, 2, 3, 4]
        assert q.ack(0) and not q.ack(0)
        delivered: list[int] = []

        def send(seq: int, payload: bytes) -> bool:
            delivered.append(decode_report(payload).seq)
            return len(delivered) < 3  # the third send fails: it stays queued

        sent = q.drain(send)
        assert delivered == [1, 2, 3] and sent == 2 and [s for s, _ in q.pending()] == [3, 4]
        assert q.next_seq() == 5
        with pytest.raises(MisuseError, match="already used"):
            q.put(_rep(2))


@pytest.mark.integration
def test_an_idle_queue_is_drained_without_touching_the_database(tmp_path: Path) -> None:
    """An idle agent drains every `report_interval_s`: once empty, no query until the next put."""
    with ReportQueue(tmp_path / "q.db") as q:
        q.put(_rep(0))
        assert q.drain(lambda seq, payload: True) == 1
        assert q.drain(lambda seq, payload: True) == 0  # finds the queue empty
        statements: list[str] = []
        q._db.set_trace_callback(statements.append)
        assert q.drain(lambda seq, payload: True) == 0 and statements == []
        q.put(_rep(1))
        assert [s for s, _ in q.pending()] == [1]  # a put is seen at once


@pytest.mark.integration
def test_full_queue_merges_oldest_reports_so_counts_survive(tmp_path: Path) -> None:
    with ReportQueue(tmp_path / "q.db", QueueConfig(max_reports=4)) as q:
        for s in range(10):
            q.put(_rep(s, count=s + 1))
        pending = [decode_report(p) for _, p in q.pending()]
        assert len(pending) == 4 and q.dropped_total() == 0
        assert sum(r.requests for r in pending) == sum(range(1, 11))  # nothing lost, only merged
        assert pending[0].seq == 0 and pending[0].merged_reports == 7
        assert sum(int(r.features[0].counts.sum()) for r in pending) == sum(range(1, 11))


@pytest.mark.integration
def test_unmergeable_or_drop_mode_counts_the_loss_in_the_next_report(tmp_path: Path) -> None:
    with ReportQueue(tmp_path / "q.db", QueueConfig(max_reports=3, on_full="drop")) as q:
        for s in range(5):
            q.put(_rep(s))
        # each drop is carried by the next report put: 0 dropped while 3 was put -> on 4
        assert q.dropped_total() == 2 and q.dropped_pending() == 1
        assert [decode_report(p).dropped_reports for _, p in q.pending()] == [0, 0, 1]
        q.put(_rep(5))
        last = decode_report(q.pending()[-1][1])
        assert last.seq == 5 and last.dropped_reports == 1 and q.dropped_pending() == 1
        assert q.dropped_total() == 3
    with ReportQueue(tmp_path / "m.db", QueueConfig(max_reports=2)) as q:
        q.put(_rep(0, "1.0.0"))
        q.put(_rep(1, "2.0.0"))
        q.put(_rep(2, "2.0.0"))  # 0 and 1 differ in version: 0 is dropped, not merged
        assert [s for s, _ in q.pending()] == [1, 2] and q.dropped_pending() == 1


_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    from agent.contract.telemetry import NumericSketch, TelemetryReport
    from agent.telemetry import QueueConfig, ReportQueue
    q = ReportQueue(sys.argv[1], QueueConfig(max_reports=3, on_full="drop"))
    for s in range(int(sys.argv[2]), int(sys.argv[3])):
        q.put(TelemetryReport("dev-1", s, "m", "1.0.0", 0.0, 1.0,
                              [NumericSketch(np.ones(12, dtype=np.int64))], []))
    # exit without closing: the committed state must still be there
""")


@pytest.mark.integration
def test_queue_survives_a_process_restart_with_its_loss_count(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    for lo, hi in ((0, 5), (5, 7)):
        out = subprocess.run([sys.executable, "-c", _CHILD, str(db), str(lo), str(hi)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    with ReportQueue(db, QueueConfig(max_reports=3, on_full="drop")) as q:
        assert [s for s, _ in q.pending()] == [4, 5, 6]
        assert q.next_seq() == 7 and q.dropped_total() == 4
        carried = [decode_report(p).dropped_reports for _, p in q.pending()]
        assert carried == [1, 1, 1]  # the loss during the first run's last put, carried by 5
        assert q.dropped_pending() == 1  # ... and the latest loss waits for the next report
        assert sum(carried) + q.dropped_pending() == q.dropped_total()


@pytest.mark.integration
def test_a_file_that_is_not_a_database_is_a_misuse(tmp_path: Path) -> None:
    bad = tmp_path / "q.db"
    bad.write_bytes(b"not a database" * 100)
    with pytest.raises(MisuseError):
        ReportQueue(bad)


@pytest.mark.integration
def test_reports_handed_out_for_sending_are_never_merged(tmp_path: Path) -> None:
    with ReportQueue(tmp_path / "q.db", QueueConfig(max_reports=3)) as q:
        q.put(_rep(0, count=1))
        q.put(_rep(1, count=2))
        assert [s for s, _ in q.pending(limit=1)] == [0]  # 0 is in flight; its ack may get lost
        q.put(_rep(2, count=3))
        q.put(_rep(3, count=4))  # full: 1 and 2 merge, 0 stays as it was sent
        pending = {s: decode_report(p) for s, p in q.pending()}
        assert sorted(pending) == [0, 1, 3] and pending[0].requests == 1 and pending[1].requests == 5
        q.put(_rep(4, count=5))
        q.put(_rep(5, count=6))  # everything left was handed out: the oldest is dropped, counted
        assert q.dropped_total() >= 1 and 0 not in [s for s, _ in q.pending()]
