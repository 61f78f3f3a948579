"""An idle agent does not load python-tuf's client, securesystemslib's signer or cryptography.

They cost ~10 MB RSS (docs/benchmarks.md, `agent_footprint`) and are needed only for a new
director document or an update cycle (cryptography also for a client certificate, loaded then
by the code that uses it: docs/agent.md, "Memory"; a device report key is signed with PyNaCl,
1.3 MB against cryptography's 8); these tests
keep a stray top-level import from bringing them back, and check that the deferred fetcher is
built once, when TUF first needs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import TrustError
from agent.trust import DirectoryFetcher, TrustClient
from fleet.trust.keys import KeyStore
from fleet.trust.repository import Repository

ROOT = Path(__file__).resolve().parents[3]
HEAVY = ("tuf.ngclient", "tuf.api.metadata", "securesystemslib.signer", "cryptography", "urllib3")

IMPORT_DAEMON = """
import json, sys
import agent.cli.main, agent.cli.agent_commands, agent.daemon.core
import agent.serving.http_server, agent.serving.unix_server
tops = {"tuf", "securesystemslib", "cryptography", "urllib3"}
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in tops)))
"""


@pytest.mark.integration
def test_daemon_import_graph_leaves_tuf_and_cryptography_out() -> None:
    cmd = [sys.executable, "-c", IMPORT_DAEMON]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    loaded = set(json.loads(out.stdout))
    assert not [m for m in HEAVY if m in loaded], f"loaded at start: {sorted(loaded)}"


SIGN_AS_DEVICE = """
import json, sys
from pathlib import Path
import agent.daemon.core
from agent.daemon.report_signer import ReportSigner
signer = ReportSigner.load(Path(sys.argv[1]), "dev-1")
signer.sign("telemetry", b"report")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "cryptography")))
"""


@pytest.mark.integration
def test_an_enrolled_device_signs_its_reports_without_loading_cryptography(tmp_path: Path) -> None:
    from agent.daemon.report_signer import ensure_key

    ensure_key(tmp_path)  # what `edgefleet agent enroll` makes (cryptography, in that command)
    cmd = [sys.executable, "-c", SIGN_AS_DEVICE, str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == []


@pytest.mark.integration
def test_fetcher_factory_runs_once_at_the_first_update_cycle(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "repo", KeyStore(tmp_path / "keys"))
    repo.init(root_threshold=1, root_keys=1)
    fetcher = DirectoryFetcher(repo.repo_dir)
    calls: list[int] = []

    def factory() -> DirectoryFetcher:
        calls.append(1)
        return fetcher

    client = TrustClient(
        tmp_path / "device/metadata",
        tmp_path / "device/targets",
        factory,
        fetcher.url_for("metadata"),
        fetcher.url_for("targets"),
        bootstrap_root=(repo.metadata_dir / "1.root.json").read_bytes(),
    )
    assert client.trusted_root().version == 1  # reading the anchor needs no fetcher
    assert calls == []
    client.refresh()
    client.refresh()
    assert calls == [1]
    with pytest.raises(TrustError, match="not listed"):  # a third cycle, same fetcher
        client.download_target("models/none/none-1.0.0.efb")
    assert calls == [1]
