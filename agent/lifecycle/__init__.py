"""Install / activate / rollback lifecycle of model bundles (see docs/lifecycle.md)."""

from agent.lifecycle.context import EventSink, LifecycleConfig, LifecycleContext, TrustSource
from agent.lifecycle.decrypt import SealingExtractor, sealing_extractor
from agent.lifecycle.machine import STABLE_STATES, TRANSITIONS, Event, Machine, State
from agent.lifecycle.runner import Lifecycle
from agent.lifecycle.slots import Slots
from agent.lifecycle.state_store import DesiredTarget, StateRecord, StateStore

__all__ = [
    "STABLE_STATES",
    "TRANSITIONS",
    "DesiredTarget",
    "Event",
    "EventSink",
    "Lifecycle",
    "LifecycleConfig",
    "LifecycleContext",
    "Machine",
    "SealingExtractor",
    "Slots",
    "State",
    "StateRecord",
    "StateStore",
    "TrustSource",
    "sealing_extractor",
]
