"""Scenario 5: an attacker's documents and bundles are refused by every device; nothing changes.

Three attacks against a fleet whose devices run v3 (installed after v1, so each device has
accepted two cohort documents):

1. replay: the old, genuinely signed cohort document naming v1 is published again;
2. unknown key: a document naming v1 with a huge sequence number, signed by a key the
   devices' TUF root does not list as a director key;
3. tampered bundle: v4 is signed into the repository, then its stored file is altered
   (one byte flipped, same length) before devices fetch it; the genuine director document
   naming it is published.

Passed when every device refuses both documents (a `director_refused` event each), refuses
the tampered bundle (TUF's hash check; the lifecycle reports it as a rollback of the
candidate), keeps serving v3 throughout (never activating v1 or v4), and the fleet's
repository and director sequences were not moved by the attacker's steps.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from agent.contract.director import DirectorDocument, sign_director
from fleet.trust.keys import KeyStore
from simulators.scenario_world import Sampler, World, failures, world
from simulators.scenarios import ScenarioContext, Verdict, register

WAIT_S = 60.0


def _refusals(w: World, kind: str, since: float, bundle_id: str | None = None) -> set[str]:
    return {
        e.device_id
        for e in w.fleet.events_of(kind, w.ids)
        if e.timestamp >= since and e.device_id and (bundle_id is None or e.bundle_id == bundle_id)
    }


def _bundle_refusals(w: World, since: float, bundle_id: str) -> set[str]:
    """Devices that gave up on `bundle_id` (the lifecycle reports a refused download as a
    rollback of the candidate, or as a failed update)."""
    return _refusals(w, "rolled_back", since, bundle_id) | _refusals(w, "update_failed", since, bundle_id)


def _unknown_key_document(w: World, ctx: ScenarioContext, bundle_id: str, cohort: str) -> bytes:
    attacker = KeyStore(ctx.data_dir / "attacker-keys")
    if not attacker.exists:
        attacker.init(root_keys=1, root_threshold=1)
    now = datetime.now(UTC).replace(microsecond=0)
    doc = DirectorDocument(
        cohort=cohort,
        sequence=1_000_000,
        issued_at=now,
        expires=now + timedelta(days=1),
        target=w.fleet.bundles[bundle_id].ref,
        reason="attacker",
    )
    return sign_director(doc, attacker.signers("director"))


@register(5, "attacker_refused", "replayed / unknown-key documents and a tampered bundle refused everywhere")
def attacker_refused(ctx: ScenarioContext) -> Verdict:
    with world(ctx, prefix="s5") as w:
        f = w.fleet
        cohorts = sorted({p.cohort for p in w.swarm.profiles})
        v1 = f.publish_bundle("1.0.0", model_seed=1)
        v3 = f.publish_bundle("3.0.0", model_seed=3)
        with Sampler(w):
            old_docs = {c: f.assign(v1.bundle_id, cohort=c)[0] for c in cohorts}
            ok_v1 = w.wait_on(v1.bundle_id, WAIT_S)
            w.assign_all(v3.bundle_id)
            ok_v3 = w.wait_on(v3.bundle_id, WAIT_S)
            repo_before = f.repo.status()
            seq_before = {c: f.signer.last_sequence(cohort=c) for c in cohorts}
            n = len(w.ids)

            # 1. replay of a genuine, older document
            t_replay = time.time()
            for c, doc in old_docs.items():
                f.publisher.publish_desired(cohort=c, document=doc)
            replay_ok = f.wait(lambda: len(_refusals(w, "director_refused", t_replay)) == n, WAIT_S)
            replayed = _refusals(w, "director_refused", t_replay)

            # 2. a document signed by a key the devices do not trust
            t_key = time.time()
            for c in cohorts:
                f.publisher.publish_desired(cohort=c, document=_unknown_key_document(w, ctx, v1.bundle_id, c))
            key_ok = f.wait(lambda: len(_refusals(w, "director_refused", t_key)) == n, WAIT_S)
            repo_after_docs = f.repo.status()
            seq_after_docs = {c: f.signer.last_sequence(cohort=c) for c in cohorts}

            # 3. a bundle altered after signing (storage or transit compromise)
            v4 = f.publish_bundle("4.0.0", model_seed=4)
            stored = f.repo.targets_dir / "models" / "mlp" / f"{v4.ref.sha256}.mlp-4.0.0.efb"
            data = bytearray(stored.read_bytes())
            data[len(data) // 2] ^= 0xFF
            stored.write_bytes(bytes(data))
            t_tamper = time.time()
            w.assign_all(v4.bundle_id)
            tamper_ok = f.wait(lambda: len(_bundle_refusals(w, t_tamper, v4.bundle_id)) == n, WAIT_S)
            reasons = sorted(
                {
                    e.reason[:100]
                    for e in f.events_of("rolled_back", w.ids) + f.events_of("update_failed", w.ids)
                    if e.bundle_id == v4.bundle_id
                }
            )
            w.assign_all(v3.bundle_id)  # the operator's answer: stay on v3
            still_v3 = w.wait_on(v3.bundle_id, WAIT_S)
        activated = [
            e
            for e in f.events_of("activated", w.ids)
            if e.timestamp >= t_replay and e.bundle_id in (v1.bundle_id, v4.bundle_id)
        ]
        problems = failures(
            [
                (ok_v1 and ok_v3, "setup: v1 then v3 not installed everywhere"),
                (replay_ok, f"replayed document refused by {len(replayed)}/{n} devices"),
                (
                    key_ok,
                    f"unknown-key document refused by {len(_refusals(w, 'director_refused', t_key))}/{n}",
                ),
                (
                    tamper_ok,
                    f"tampered bundle refused by {len(_bundle_refusals(w, t_tamper, v4.bundle_id))}/{n}",
                ),
                (still_v3, f"devices not on v3 at the end: {f.active_counts(w.ids)}"),
                (not activated, f"{len(activated)} activations during the attacks"),
                (repo_after_docs == repo_before, "the repository changed during the document attacks"),
                (seq_after_docs == seq_before, "the director sequences moved during the document attacks"),
            ]
        )
        metrics = {
            "devices": float(n),
            "director_refused": float(len(f.events_of("director_refused", w.ids))),
            "tampered_refused": float(len(_bundle_refusals(w, t_tamper, v4.bundle_id))),
        }
        details = (
            f"{n} devices refused the replay, the unknown key and the tampered bundle "
            f"({reasons[0] if reasons else ''}); all kept serving {v3.bundle_id}"
            if not problems
            else "; ".join(problems)
        )
        return Verdict("attacker_refused", not problems, details, metrics)
