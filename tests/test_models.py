"""``models.evolve``: ``dataclasses.replace`` without ``__init__``, for the per-fire paths."""

from __future__ import annotations

from dataclasses import replace

import pytest
from storage.helpers import T0, an_execution

from chronoplane.server.models import (
    Event,
    EventKind,
    EventResource,
    ExecutionState,
    evolve,
)


def test_evolve_makes_what_replace_makes_and_leaves_the_original_alone() -> None:
    pending = an_execution()
    running = evolve(pending, state=ExecutionState.RUNNING, instance_id="i1", start_time=T0)
    assert running == replace(
        pending, state=ExecutionState.RUNNING, instance_id="i1", start_time=T0
    )
    assert repr(running) == repr(
        replace(pending, state=ExecutionState.RUNNING, instance_id="i1", start_time=T0)
    )
    assert pending.state is ExecutionState.PENDING and pending.instance_id == "inst-test"
    with pytest.raises(AttributeError):
        running.state = ExecutionState.FAILED  # type: ignore[misc]


def test_evolve_refuses_a_field_the_class_does_not_have() -> None:
    with pytest.raises(TypeError, match="Execution has no field stat"):
        evolve(an_execution(), stat=ExecutionState.RUNNING)


def test_evolve_does_not_carry_a_cached_value_over() -> None:
    first, second = an_execution(id="e1"), an_execution(id="e2")
    event = Event(
        cursor=7,
        kind=EventKind.MODIFIED,
        job_id="j1",
        labels={},
        resource=EventResource.EXECUTION,
        decode=lambda: first,
    )
    assert event.execution == first  # cached from here on
    moved = evolve(event, cursor=8, decode=lambda: second)
    assert moved.cursor == 8 and moved.execution == second
    assert event.execution == first
