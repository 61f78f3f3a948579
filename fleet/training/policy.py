"""What a model's retraining does: its trainer, data, gate and rollout (`TrainingSettings`).

A policy per model, in the fleet settings (`training.policies`, or the JSON file
`EDGEFLEET_TRAINING_POLICIES` names). A `retrain` trigger of a model that has one starts a job;
`POST /v1/training/jobs` starts one for it too. Without a policy nothing is trained.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENTRY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
QuantizeMode = Literal["none", "dynamic", "static"]  # fleet.registry.quantize's (not imported: numpy)
PLACEHOLDERS = ("{job}", "{reference}", "{train}", "{out}", "{parent_model}")


class TrainerSpec(BaseModel):
    """The user's trainer: a Python entry point `module:function` or an argv template (one of).

    Either way it runs in a subprocess with `timeout_s`; see docs/training.md for the interface.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    entry_point: str | None = Field(default=None, description="`module:function`, called with a TrainerJob")
    command: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=64,
                                            description=f"argv; placeholders {', '.join(PLACEHOLDERS)}")
    timeout_s: float = Field(default=1800.0, gt=0, le=7 * 24 * 3600)
    env: dict[str, str] = Field(default_factory=dict, max_length=64,
                                description="added to the fleet's environment for the subprocess")
    max_log_lines: int = Field(default=2000, ge=10, le=100_000)

    @model_validator(mode="after")
    def _one(self) -> TrainerSpec:
        if (self.entry_point is None) == (self.command is None):
            raise ValueError("give exactly one of entry_point and command")
        if any(not ENV_RE.match(k) for k in self.env):
            raise ValueError("env names must be letters, digits and underscores")
        if self.entry_point is not None and not ENTRY_RE.match(self.entry_point):
            raise ValueError("entry_point must look like package.module:function")
        return self


class CollectSpec(BaseModel):
    """The collection a job starts for its cohort (`fleet.collection`): the signed policy's caps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Literal["reservoir", "low_confidence"] = "reservoir"
    max_rows: int = Field(default=1000, ge=1, le=100_000, description="per device")
    max_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    max_seconds: int = Field(default=3600, ge=1, le=7 * 86400)
    only_while_drift: bool = False
    chunk_bytes: int = Field(default=64 * 1024, ge=1024, le=192 * 1024)


class AccuracyGate(BaseModel):
    """When a trained model may become a version: accuracy on the holdout (reference rows the
    trainer never saw plus the held-out share of the collected rows), against the parent's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_accuracy: float = Field(default=0.0, ge=0, le=1, description="on the whole holdout")
    min_gain_collected: float = Field(default=0.0, ge=-1, le=1,
                                      description="new minus parent accuracy on the collected holdout rows")
    max_reference_drop: float = Field(default=0.05, ge=0, le=1,
                                      description="parent minus new accuracy on the reference holdout rows")
    holdout_fraction: float = Field(default=0.25, gt=0, lt=1)


class TrainingPolicy(BaseModel):
    """One model's retraining: where its data is, who trains, the gate, and what follows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    reference_data: str = Field(min_length=1, description="`.npz` with `x` (rows) and `y` (class labels)")
    collect: CollectSpec | None = Field(default=None, description="start a collection on the trigger's "
                                        "cohort and train on what it brings (see docs/training.md)")
    collect_policy_id: str | None = Field(default=None, min_length=1, max_length=64,
                                          description="or: train on the dataset versions of this collection")
    labeler: str | None = Field(default=None, description="`module:function` x -> labels for collected rows "
                                "that carry no `y` (run in a subprocess)")
    min_rows: int = Field(default=200, ge=1, le=10_000_000, description="collected rows before training")
    data_timeout_s: float = Field(default=3600.0, gt=0, le=30 * 24 * 3600)
    trainer: TrainerSpec
    gate: AccuracyGate = Field(default_factory=AccuracyGate)
    quantize: QuantizeMode = "none"
    rollout: Literal["automatic", "approval"] = "approval"
    selector: str = Field(default="cohort={cohort}", max_length=1024,
                          description="the canary's cohort; {cohort} is the trigger's")
    strategy: dict[str, Any] = Field(default_factory=lambda: {"kind": "canary"},
                                    description="the rollout's strategy document (docs/rollouts.md)")
    thresholds: dict[str, float] = Field(default_factory=dict, description="the rollout's quality gates")
    profile: Literal["collected", "reference_and_collected"] = Field(
        default="collected", description="the new bundle's reference profile (its drift baseline): the "
        "collected rows (the cohort it is made for) or the reference and collected rows together")
    cooldown_s: float = Field(default=3600.0, ge=0, le=90 * 24 * 3600,
                              description="a cohort's trigger within this long of its last job starts none")
    max_trigger_age_s: float = Field(default=86400.0, gt=0, le=90 * 24 * 3600,
                                     description="older triggers start no job (a policy added today "
                                     "does not retrain for last month's drift)")
    max_attempts: int = Field(default=3, ge=1, le=20, description="restarts of a step before the job fails")

    @model_validator(mode="after")
    def _rollout_plan(self) -> TrainingPolicy:
        # The rollout models pull in numpy, which `fleet.settings` (every CLI start) must not load.
        from fleet.rollouts.gates import GateThresholds  # lazy: numpy, only when a policy is validated
        from fleet.rollouts.strategies import StrategyConfig  # lazy: as above

        StrategyConfig.model_validate(self.strategy)  # refused now, not when the canary starts
        GateThresholds.model_validate(self.thresholds)
        return self

    @field_validator("labeler")
    @classmethod
    def _entry(cls, v: str | None) -> str | None:
        if v is not None and not ENTRY_RE.match(v):
            raise ValueError("labeler must look like package.module:function")
        return v


class TrainingSettings(BaseModel):
    """The training worker (`fleet/training/worker.py`) and the policies it knows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tick_s: float = Field(default=5.0, ge=0.05, le=3600)
    policies: tuple[TrainingPolicy, ...] = ()

    def policy(self, model: str) -> TrainingPolicy | None:
        return next((p for p in self.policies if p.model == model), None)
