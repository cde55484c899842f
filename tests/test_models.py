"""``models.evolve``: ``dataclasses.replace`` without ``__init__``, for the per-fire paths."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from chronoplane.server.models import (
    Event,
    EventKind,
    EventResource,
    Execution,
    ExecutionSource,
    ExecutionState,
    evolve,
)

T0 = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)


def an_execution(**changes: object) -> Execution:
    execution = Execution(
        id="e1",
        job_id="j1",
        state=ExecutionState.PENDING,
        source=ExecutionSource.SCHEDULE,
        scheduled_time=T0,
        create_time=T0,
        task="chronoplane.echo",
        args={"n": 1},
        instance_id="",
    )
    return replace(execution, **changes)  # type: ignore[arg-type]


def test_evolve_makes_what_replace_makes_and_leaves_the_original_alone() -> None:
    pending = an_execution()
    running = evolve(pending, state=ExecutionState.RUNNING, instance_id="i1", start_time=T0)
    assert running == replace(
        pending, state=ExecutionState.RUNNING, instance_id="i1", start_time=T0
    )
    assert repr(running) == repr(
        replace(pending, state=ExecutionState.RUNNING, instance_id="i1", start_time=T0)
    )
    assert pending.state is ExecutionState.PENDING and pending.instance_id == ""
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
