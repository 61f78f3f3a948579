"""Report keys of simulated devices (issue 14): derived from the device id, simulators only.

The swarm's agents and the load devices sign their reports like real devices, but enrolling
each through `POST /v1/enroll` would make the simulators measure enrollment. So a simulated
device's Ed25519 key is derived from its id (`sha256("edgefleet-sim-device:" + id)` as the
seed): the simulated fleet registers the public halves when it puts the devices in the store,
and the devices, possibly in other processes, sign with the private ones. Anyone who knows a
device id knows its simulated key: never use this for anything but simulated devices.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from agent.daemon.report_signer import KEY_FILE
from agent.durable_io import write_durably


def sim_device_key(device_id: str) -> Ed25519PrivateKey:
    """The simulated device's report key, derived from its id."""
    return Ed25519PrivateKey.from_private_bytes(
        hashlib.sha256(b"edgefleet-sim-device:" + device_id.encode()).digest())


def sim_device_public_key(device_id: str) -> bytes:
    """The raw public half the simulated fleet registers."""
    return sim_device_key(device_id).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def install_sim_key(state_dir: Path, device_id: str) -> None:
    """Put the simulated device's key where its agent looks (`<state_dir>/report.key`, 0600)."""
    path = Path(state_dir) / KEY_FILE
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = sim_device_key(device_id).private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    write_durably(path, pem, mode=0o600)
