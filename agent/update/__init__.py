"""Updates from the hub: the TUF client, and the life cycle of a version on this device.

The life cycle is pure (states, events and one transition table in `lifecycle`; canary buckets
and the assignment in `canary`; probation verdicts in `probation`); `state_file` persists its
record, atomically.
"""

from agent.update.canary import AssignedVersion, Assignment, Choice, bucket, choose, in_canary
from agent.update.lifecycle import (
    MAX_ATTEMPTS,
    TRANSITIONS,
    Action,
    ActionKind,
    Event,
    EventKind,
    Limits,
    State,
    UpdateRecord,
    VersionRef,
    step,
)
from agent.update.probation import LatencyWindow, Outcome, ProbationTracker, Verdict
from agent.update.state_file import StateFile

__all__ = [
    "MAX_ATTEMPTS",
    "TRANSITIONS",
    "Action",
    "ActionKind",
    "AssignedVersion",
    "Assignment",
    "Choice",
    "Event",
    "EventKind",
    "LatencyWindow",
    "Limits",
    "Outcome",
    "ProbationTracker",
    "State",
    "StateFile",
    "UpdateRecord",
    "Verdict",
    "VersionRef",
    "bucket",
    "choose",
    "in_canary",
    "step",
]
