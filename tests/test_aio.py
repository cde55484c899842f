"""The asyncio helpers the server's shutdown relies on."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from chronoplane.server.aio import GroupCommit, cancelled, report_slow


async def test_a_task_that_swallows_its_cancellation_is_asked_again() -> None:
    asked = 0

    async def stubborn() -> None:
        nonlocal asked
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                asked += 1
                if asked == 1:
                    continue  # what a retry loop around an interrupted query does
                raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancelled(task), 5)
    assert task.cancelled() and asked == 2


async def test_a_slow_step_is_named_with_its_chain_of_awaits(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def flush_to_the_database() -> None:
        await asyncio.Event().wait()

    async def stop_the_runner() -> None:
        await flush_to_the_database()

    stuck = asyncio.create_task(stop_the_runner(), name="unwind")
    log = logging.getLogger("test.slow")
    with caplog.at_level(logging.WARNING, logger="test.slow"):
        watchdog = asyncio.create_task(report_slow("shutting down", 0.05, 10, log))
        await asyncio.sleep(0.3)
    watchdog.cancel()
    stuck.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stuck
    [record] = caplog.records
    assert "shutting down has taken 0 s" in record.getMessage()
    assert "unwind: stop_the_runner (" in record.getMessage()
    assert "-> flush_to_the_database (" in record.getMessage()


async def test_a_group_commit_writes_concurrent_items_together_one_per_key() -> None:
    groups: list[list[str]] = []

    async def write(items: list[str]) -> list[str]:
        groups.append(items)
        await asyncio.sleep(0.01)
        return [item.upper() for item in items]

    commit: GroupCommit[str, str] = GroupCommit(write, name="test", key=lambda i: i[0])
    items = ["a1", "b1", "c1", "b2", "d1", "a2", "e1"]
    results = await asyncio.gather(*map(commit.submit, items))
    assert results == [item.upper() for item in items]
    # As they came, a group ending before a repeated key.
    assert groups == [["a1", "b1", "c1"], ["b2", "d1", "a2", "e1"]]
