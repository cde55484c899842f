"""Execution ids sort by creation, also within one millisecond."""

from __future__ import annotations

from chronoplane.server.ids import new_execution_id


def test_ids_made_in_a_burst_sort_in_the_order_they_were_made() -> None:
    made = [new_execution_id() for _ in range(20_000)]
    assert sorted(made) == made
    assert len(set(made)) == len(made)
    assert all(len(i) == 28 and int(i, 16) >= 0 for i in made[:10])
