"""Executions on SQLAlchemy: the aggregate's four parts together (admission.py, claims.py,
progress.py, history.py), as the contract (storage/abc/executions.py) has them."""

from __future__ import annotations

from chronoplane.server.storage.abc import ExecutionStore
from chronoplane.server.storage.sqlalchemy.admission import Admissions
from chronoplane.server.storage.sqlalchemy.claims import Claims
from chronoplane.server.storage.sqlalchemy.history import History
from chronoplane.server.storage.sqlalchemy.progress import Outcomes

__all__ = ["SqlExecutionStore"]


class SqlExecutionStore(Admissions, Claims, Outcomes, History, ExecutionStore):
    """Admission writes executions (PENDING in the queue, or SKIPPED, MISSED); claims make
    them RUNNING on an instance; progress records how they ended and frees their slots;
    history reads and purges them (docs/decisions/0010-execution-queue.md)."""
