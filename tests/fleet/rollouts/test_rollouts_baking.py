"""Rollout status while a stage bakes: `baking_until` (API, CLI), and all_at_once's default bake.

The controller runs over a real store with an injected clock (tests/support/rollout_world.py):
nothing sleeps.
"""

from __future__ import annotations

import pytest

from fleet.api.schemas import RolloutStatus
from fleet.db.rows import iso
from fleet.rollouts.strategies import StrategyConfig
from tests.support.rollout_world import World
from tests.support.rollout_world import world as world  # the fixture


def test_all_at_once_does_not_bake_by_default_but_keeps_an_explicit_bake() -> None:
    assert StrategyConfig.parse({"kind": "all_at_once"}).bake_s == 0
    assert StrategyConfig.parse({"kind": "all_at_once", "bake_s": 30}).bake_s == 30
    assert StrategyConfig.parse({"kind": "canary"}).bake_s == 600
    assert StrategyConfig.parse({}).bake_s == 600


@pytest.mark.integration
def test_status_says_until_when_a_stage_bakes(world: World) -> None:
    devs = ["d0", "d1"]
    world.enroll(*devs)
    rid = world.rollout({"kind": "canary", "stages": [50, 100], "bake_s": 60})
    world.ctl.tick()
    assert world.store.rollouts.status(rid).baking_until is None  # the stage's device has no outcome
    first = world.assigned(rid)
    world.commit_all(first)
    done_at = world.clock.now
    world.ctl.tick()
    status = world.store.rollouts.status(rid)
    assert (status.state, status.stage, status.baking_until) == ("running", 0, iso(done_at + 60))
    assert RolloutStatus.model_validate(status).baking_until == iso(done_at + 60)  # the API's answer
    world.clock.advance(61)
    world.ctl.tick()
    after = world.store.rollouts.status(rid)
    assert (after.stage, after.baking_until) == (1, None)  # the next stage runs, nothing bakes


@pytest.mark.integration
def test_a_single_stage_all_at_once_completes_without_waiting(world: World) -> None:
    world.enroll("d0", "d1")
    rid = world.rollout({"kind": "all_at_once"})
    world.ctl.tick()
    world.commit_all(world.assigned(rid))
    world.ctl.tick()
    world.ctl.tick()
    assert world.state(rid) == ("completed", 0)
    assert world.store.rollouts.status(rid).baking_until is None
