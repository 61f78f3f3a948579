"""CPU accounting of `ingest_scale` (benchmarks/proc_cpu.py): /proc stat lines, groups, vanished processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.proc_cpu import (
    CLOCK_TICKS,
    CpuMeter,
    parse_stat,
    postgres_member,
    postgres_pids,
    read_cpu_s,
    window_cpu_s,
)

pytestmark = pytest.mark.unit


def _stat(pid: int, comm: str, utime: int, stime: int) -> str:
    rest = ["S", "1", "1", "1", "0", "-1", "4194560", "100", "0", "0", "0", str(utime), str(stime), "0", "0"]
    return f"{pid} ({comm}) {' '.join(rest)} 20 0 1 0 12345 0 0\n"


def _proc(root: Path, pid: int, comm: str, utime: int, stime: int, cmdline: str = "") -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "stat").write_text(_stat(pid, comm, utime, stime))
    (d / "comm").write_text(comm + "\n")
    (d / "cmdline").write_text(cmdline.replace(" ", "\0"))


def test_parse_stat_reads_utime_plus_stime_in_seconds() -> None:
    assert parse_stat(_stat(42, "python", 250, 50), ticks=100) == ("python", 3.0)


def test_parse_stat_takes_the_last_parenthesis_of_a_name_with_spaces_and_parentheses() -> None:
    assert parse_stat(_stat(7, "a) (b c", 10, 20), ticks=10) == ("a) (b c", 3.0)


@pytest.mark.parametrize("line", ["", "42 python S 1", "42 (python) S 1 2 3"])
def test_parse_stat_refuses_what_is_not_a_stat_line(line: str) -> None:
    with pytest.raises(ValueError):
        parse_stat(line)


def test_read_cpu_s_of_a_vanished_process_is_none(tmp_path: Path) -> None:
    _proc(tmp_path, 10, "x", 100, 0)
    assert read_cpu_s(10, tmp_path) == pytest.approx(100 / CLOCK_TICKS)
    assert read_cpu_s(11, tmp_path) is None


def test_window_cpu_counts_new_processes_whole_and_vanished_ones_to_their_last_reading() -> None:
    first = {1: 10.0, 2: 5.0}
    last = {1: 12.5, 2: 6.0, 3: 0.75}  # 3 began inside the window; 2 vanished after reading 6.0
    assert window_cpu_s(first, last) == pytest.approx(2.5 + 1.0 + 0.75)
    assert window_cpu_s({1: 3.0}, {1: 2.0}) == 0.0  # a reused pid never counts negative


def test_cpu_meter_keeps_a_vanished_process_at_its_last_sample(tmp_path: Path) -> None:
    _proc(tmp_path, 100, "worker", 100, 0)
    _proc(tmp_path, 101, "worker", 200, 0)
    pids = [100, 101]
    meter = CpuMeter({"worker": lambda: list(pids)}, proc=tmp_path)
    meter.start()
    _proc(tmp_path, 100, "worker", 150, 50)  # +100 ticks
    _proc(tmp_path, 101, "worker", 300, 0)  # +100 ticks, then it exits
    meter.sample()
    (tmp_path / "101" / "stat").unlink()
    _proc(tmp_path, 100, "worker", 250, 50)  # +100 ticks more
    meter.sample()
    assert meter.seconds()["worker"] == pytest.approx(300 / CLOCK_TICKS)  # 101's second counts, once


@pytest.mark.parametrize(("cmdline", "member"), [
    ("/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main", True),
    ("postgres: 15/main: checkpointer ", True),
    ("postgres: 15/main: walwriter ", True),
    ("postgres: 15/main: postgres bench_ab 127.0.0.1(40112) idle", True),
    ("postgres: 15/main: postgres other_db 127.0.0.1(40113) INSERT", False),
    ("postgres: postgres bench_ab [local] idle", True),
    ("postgres: postgres other_db [local] idle", False),
    ("postgres: 15/main: autovacuum worker other_db", False),
    ("postgres: 15/main: autovacuum worker bench_ab", True),
])
def test_postgres_member_counts_the_runs_backends_and_the_servers_own_processes(cmdline: str,
                                                                                member: bool) -> None:
    assert postgres_member(cmdline.replace(" ", "\0"), "bench_ab") is member


def test_postgres_pids_lists_only_postgres_processes_of_the_run(tmp_path: Path) -> None:
    _proc(tmp_path, 5, "postgres", 1, 1, "postgres: 15/main: postgres bench_ab 127.0.0.1(1) idle")
    _proc(tmp_path, 6, "postgres", 1, 1, "postgres: 15/main: postgres other 127.0.0.1(2) idle")
    _proc(tmp_path, 7, "mosquitto", 1, 1, "mosquitto -c x")
    (tmp_path / "self").mkdir()
    assert postgres_pids("bench_ab", tmp_path) == [5]
