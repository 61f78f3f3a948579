"""`edgefleet-tuf-client` as a subprocess against the fleet's repository over real HTTP."""

from __future__ import annotations

import functools
import hashlib
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote

import pytest
from click.testing import CliRunner

from agent.cli.main import cli
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

CLIENT = str(Path(sys.executable).parent / "edgefleet-tuf-client")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served_repo(tmp_path: Path) -> Iterator[tuple[Repository, str]]:
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=2, root_keys=3)
    handler = functools.partial(_QuietHandler, directory=str(repo.repo_dir))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield repo, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLIENT, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.integration
def test_init_refresh_download_over_http(served_repo: tuple[Repository, str], tmp_path: Path) -> None:
    repo, base = served_repo
    payloads = {"models/a/a-1.0.0.efb": b"A" * 3000, "models/b/b-2.0.0.efb": b"B" * 5000}
    for path, data in payloads.items():
        src = tmp_path / path.rsplit("/", 1)[1]
        src.write_bytes(data)
        repo.add_target(src, path)
    md, targets = tmp_path / "client/md", tmp_path / "client/targets"
    common = ["--metadata-dir", str(md), "--metadata-url", f"{base}/metadata"]

    assert _run("--metadata-dir", str(md), "init", str(repo.metadata_dir / "1.root.json")).returncode == 0
    assert (md / "root.json").exists()
    refreshed = _run(*common, "refresh")
    assert refreshed.returncode == 0, refreshed.stderr
    assert {p.name for p in md.glob("*.json")} == {
        "root.json",
        "timestamp.json",
        "snapshot.json",
        "targets.json",
    }

    dl_args = [*common, "--target-base-url", f"{base}/targets", "--target-dir", str(targets)]
    names = [a for p in payloads for a in ("--target-name", p)]
    downloaded = _run(*dl_args, *names, "download")
    assert downloaded.returncode == 0, downloaded.stderr
    for path, data in payloads.items():
        assert (targets / quote(path, "")).read_bytes() == data

    # cached: a second download does not rewrite the file
    first = targets / quote("models/a/a-1.0.0.efb", "")
    mtime = first.stat().st_mtime_ns
    assert _run(*dl_args, "--target-name", "models/a/a-1.0.0.efb", "download").returncode == 0
    assert first.stat().st_mtime_ns == mtime

    # a tampered target on the server: exit 1, nothing written
    sha = hashlib.sha256(payloads["models/b/b-2.0.0.efb"]).hexdigest()
    (repo.targets_dir / "models/b" / f"{sha}.b-2.0.0.efb").write_bytes(b"X" * 5000)
    (targets / quote("models/b/b-2.0.0.efb", "")).unlink()
    failed = _run(*dl_args, "--target-name", "models/b/b-2.0.0.efb", "download")
    assert failed.returncode == 1
    assert "LengthOrHashMismatchError" in failed.stderr
    assert not (targets / quote("models/b/b-2.0.0.efb", "")).exists()

    # an unknown target and a missing --target-dir are failures too
    assert _run(*dl_args, "--target-name", "models/none.efb", "download").returncode == 1
    assert _run(*common, "--target-name", "x", "download").returncode == 1


@pytest.mark.integration
def test_refresh_follows_root_rotation_over_http(served_repo: tuple[Repository, str], tmp_path: Path) -> None:
    repo, base = served_repo
    md = tmp_path / "client/md"
    common = ["--metadata-dir", str(md), "--metadata-url", f"{base}/metadata"]
    assert _run("--metadata-dir", str(md), "init", str(repo.metadata_dir / "1.root.json")).returncode == 0
    assert _run(*common, "refresh").returncode == 0
    repo.keystore.rotate("root")
    repo.rotate_root()
    assert _run(*common, "refresh").returncode == 0
    assert b'"version": 2' in (md / "root.json").read_bytes()


@pytest.mark.integration
def test_fleet_cli_keys_repo_director(tmp_path: Path) -> None:
    runner = CliRunner()
    keys, repo_dir = str(tmp_path / "k"), str(tmp_path / "r")
    bundle = tmp_path / "m.efb"
    bundle.write_bytes(b"opaque")

    def invoke(*args: str) -> str:
        result = runner.invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    invoke("keys", "init", "--keys-dir", keys, "--root-threshold", "2", "--root-keys", "3")
    assert (tmp_path / "k/keys.json").exists()
    pems = list((tmp_path / "k/private").rglob("*.pem"))
    assert len(pems) == 7 and all(p.stat().st_mode & 0o777 == 0o600 for p in pems)
    listing = invoke("keys", "list", "--keys-dir", keys)
    assert "PRIVATE" not in listing and "root: threshold 2" in listing
    invoke("repo", "init", "--keys-dir", keys, "--repo-dir", repo_dir)
    invoke(
        "repo",
        "add-bundle",
        str(bundle),
        "--keys-dir",
        keys,
        "--repo-dir",
        repo_dir,
        "--target-path",
        "m/m.efb",
    )
    assert '"version": 2' in invoke("repo", "status", "--keys-dir", keys, "--repo-dir", repo_dir)
    assert "timestamp version 3" in invoke(
        "repo", "refresh-timestamp", "--keys-dir", keys, "--repo-dir", repo_dir
    )
    doc = invoke(
        "repo",
        "director",
        "--keys-dir",
        keys,
        "--repo-dir",
        repo_dir,
        "--device",
        "d1",
        "--target",
        "m/m.efb",
    )
    assert '"sequence":1' in doc and '"device_id":"d1"' in doc
    assert "root version 2" in invoke(
        "keys", "rotate", "--keys-dir", keys, "--role", "director", "--repo-dir", repo_dir
    )
    bad = runner.invoke(
        cli, ["repo", "director", "--keys-dir", keys, "--repo-dir", repo_dir, "--target", "m/m.efb"]
    )
    assert bad.exit_code != 0 and "exactly one" in bad.output
