"""Prometheus metrics, served at ``/metrics`` with ``chronoplane serve --metrics-address
HOST:PORT`` (off by default). Every metric is made with the official ``prometheus-client``
library and registered here, in its default registry, which also holds the library's own
``process_*``, ``python_gc_*`` and ``python_info`` collectors.

Labels are bounded: never a job id or an execution id. ``state`` is an execution state in
lower case (``succeeded``, ``failed``, ``missed``, ``skipped``, ``interrupted``,
``cancelled``, ``timed_out``, ``abandoned``); ``executor`` is ``inline`` or ``celery``;
``kind`` is ``executions`` or ``jobs``; ``grpc_method`` is a method the server serves
(``/chronoplane.v1.SchedulerService/GetJob``; calls of unknown methods are not counted).
The scheduling counters and the lateness histogram marked *task* below carry a ``task``
label (the task's name) only with ``--metrics-task-labels``.

gRPC (one interceptor sees every call; transport/metrics.py):

- ``chronoplane_grpc_server_handled_total{grpc_method, grpc_code}`` counter: calls ended,
  by status code (``OK``, ``NOT_FOUND``, ...).
- ``chronoplane_grpc_server_handling_seconds{grpc_method}`` histogram: how long a call took;
  a stream's until it ended.
- ``chronoplane_grpc_server_streams_open{grpc_method}`` gauge: server streams open now.
- ``chronoplane_grpc_server_msg_sent_total{grpc_method}`` counter: messages sent on streams.

Scheduling (each instance counts what it did itself; ``sum()`` over instances is the
cluster's):

- ``chronoplane_fires_total`` (*task*) counter: scheduled fires the leader recorded as an
  execution (to run, SKIPPED by the overlap policy, or FAILED for want of the task); not
  manual runs, and not the fires a MISSED record stands for.
- ``chronoplane_manual_runs_total`` (*task*) counter: executions TriggerJob and BackfillJob
  created through this instance.
- ``chronoplane_fire_lateness_seconds`` (*task*) histogram: start time minus scheduled time
  of each execution that starts on this instance (inline executions; a backfill's is not
  observed, it is late on purpose; a job's jitter counts as lateness). Buckets from 1 ms
  to 60 s.
- ``chronoplane_executions_finished_total{state, executor}`` (*task*) counter: executions
  that reached a final state. Inline ones are counted by the instance that wrote the state:
  that ran the execution, that recorded the SKIPPED or MISSED record, that cancelled it while
  it was PENDING, or (ABANDONED) the leader that judged its instance dead. Celery ones end
  on the workers, in other processes: the leader counts them, reading every few seconds
  the Celery executions whose end time passed since its last read (by the ``end_time``
  index, a few seconds behind, so that an end written late is not missed). A change of
  leader may leave out the Celery ends of the seconds between the two leaders' reads;
  nothing is counted twice.
- ``chronoplane_executions_pending`` and ``chronoplane_executions_running`` gauges: the
  cluster's PENDING (the queue, due or not) and RUNNING executions, read by the leader
  every few seconds; other instances export 0, so ``max()`` and ``sum()`` both give the
  cluster's.
- ``chronoplane_oldest_pending_execution_age_seconds`` gauge: how long the PENDING execution
  that has been due longest has been due (0 when none is); same rule.
- ``chronoplane_fires_missed_total`` (*task*) counter: fires recorded in MISSED records (a
  record can stand for many).
- ``chronoplane_fires_skipped_total`` (*task*) counter: fires recorded SKIPPED.
- ``chronoplane_retries_total`` (*task*) counter: retry attempts this instance queued (after
  inline failures, and after ABANDONED; a Celery worker queues its own, not counted here).

Cluster:

- ``chronoplane_leader`` gauge: 1 while this instance leads, else 0.
- ``chronoplane_leader_epoch`` gauge: the epoch it leads with, or last led with.
- ``chronoplane_leadership_lost_total`` counter: terms this instance lost or gave up.
- ``chronoplane_heartbeat_duration_seconds`` histogram: the instance's heartbeats (its row).
- ``chronoplane_lease_renewal_duration_seconds`` histogram: the leader's lease renewals
  (PostgreSQL; a lone SQLite server has no lease).
- ``chronoplane_instances_alive`` gauge: live instances, as this one's last heartbeat saw.

Watches:

- ``chronoplane_watchers_open{kind}`` gauge: watch streams open on this instance.
- ``chronoplane_watch_events_sent_total{kind}`` counter: messages sent on them (snapshot
  and progress messages included).
- ``chronoplane_watchers_ended_lagging_total{kind}`` counter: streams ended because their
  client fell behind (RESOURCE_EXHAUSTED).
- ``chronoplane_watch_event_lag_seconds`` histogram: from the event's commit to its send on
  a stream. The commit time is the event's ``create_time``, written by the transaction that
  made the change just before it commits, on the writing instance's clock (so clock skew
  between instances shows in it); snapshot and progress messages are not observed.

Runtime:

- ``chronoplane_event_loop_lag_seconds`` histogram: how late the loop ran the stall
  detector's tick (stall.py), every 100 ms.
- ``chronoplane_db_pool_connections_in_use`` and ``chronoplane_db_pool_connections_waiting``
  gauges: the SQLAlchemy pool's checked-out connections, and the callers waiting for one,
  read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    start_http_server,
)

__all__ = [
    "DB_POOL_IN_USE",
    "DB_POOL_WAITING",
    "EVENT_LOOP_LAG",
    "EXECUTIONS_PENDING",
    "EXECUTIONS_RUNNING",
    "GRPC_HANDLED",
    "GRPC_HANDLING_SECONDS",
    "GRPC_MSG_SENT",
    "GRPC_STREAMS_OPEN",
    "HEARTBEAT_DURATION",
    "INSTANCES_ALIVE",
    "LEADER",
    "LEADERSHIP_LOST",
    "LEADER_EPOCH",
    "LEASE_RENEWAL_DURATION",
    "OLDEST_PENDING_AGE",
    "WATCHERS_ENDED_LAGGING",
    "WATCHERS_OPEN",
    "WATCH_EVENTS_SENT",
    "WATCH_EVENT_LAG",
    "MetricsServer",
    "TaskMetrics",
    "sample_pool",
    "scheduling",
    "use_task_labels",
]

# No *_created series: they double what a scrape carries, and dashboards do not use them.
disable_created_metrics()  # type: ignore[no-untyped-call]

# Seconds: a GetJob takes well under a millisecond, a stream may last hours.
_RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_LATENESS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_LOOP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

# -- gRPC ---------------------------------------------------------------------------------------

GRPC_HANDLED = Counter(
    "chronoplane_grpc_server_handled_total",
    "RPCs ended, by method and status code.",
    ["grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "chronoplane_grpc_server_handling_seconds",
    "How long RPCs took (a stream: until it ended).",
    ["grpc_method"],
    buckets=_RPC_BUCKETS,
)
GRPC_STREAMS_OPEN = Gauge(
    "chronoplane_grpc_server_streams_open", "Server streams open now.", ["grpc_method"]
)
GRPC_MSG_SENT = Counter(
    "chronoplane_grpc_server_msg_sent_total", "Messages sent on server streams.", ["grpc_method"]
)

# -- scheduling: the cluster's queue, read by the leader -------------------------------------

EXECUTIONS_PENDING = Gauge(
    "chronoplane_executions_pending",
    "PENDING executions of the cluster (read by the leader; 0 on other instances).",
)
EXECUTIONS_RUNNING = Gauge(
    "chronoplane_executions_running",
    "RUNNING executions of the cluster (read by the leader; 0 on other instances).",
)
OLDEST_PENDING_AGE = Gauge(
    "chronoplane_oldest_pending_execution_age_seconds",
    "How long the longest-due PENDING execution has been due (leader; 0 when none is).",
)

# -- cluster ------------------------------------------------------------------------------------

LEADER = Gauge("chronoplane_leader", "1 while this instance leads, else 0.")
LEADER_EPOCH = Gauge("chronoplane_leader_epoch", "The epoch this instance leads or last led with.")
LEADERSHIP_LOST = Counter("chronoplane_leadership_lost_total", "Leadership terms lost.")
HEARTBEAT_DURATION = Histogram(
    "chronoplane_heartbeat_duration_seconds",
    "How long the instance's heartbeats took.",
    buckets=_DB_BUCKETS,
)
LEASE_RENEWAL_DURATION = Histogram(
    "chronoplane_lease_renewal_duration_seconds",
    "How long the leader's lease renewals took.",
    buckets=_DB_BUCKETS,
)
INSTANCES_ALIVE = Gauge("chronoplane_instances_alive", "Live instances, as last heartbeat saw.")

# -- watches ------------------------------------------------------------------------------------

WATCHERS_OPEN = Gauge("chronoplane_watchers_open", "Watch streams open.", ["kind"])
WATCH_EVENTS_SENT = Counter(
    "chronoplane_watch_events_sent_total", "Messages sent on watch streams.", ["kind"]
)
WATCHERS_ENDED_LAGGING = Counter(
    "chronoplane_watchers_ended_lagging_total",
    "Watch streams ended because their client fell behind.",
    ["kind"],
)
WATCH_EVENT_LAG = Histogram(
    "chronoplane_watch_event_lag_seconds",
    "From an event's commit to its send on a watch stream.",
    buckets=_LATENESS_BUCKETS,
)

# -- runtime ------------------------------------------------------------------------------------

EVENT_LOOP_LAG = Histogram(
    "chronoplane_event_loop_lag_seconds",
    "How late the event loop ran a timer due every 100 ms.",
    buckets=_LOOP_BUCKETS,
)
DB_POOL_IN_USE = Gauge(
    "chronoplane_db_pool_connections_in_use", "Database pool connections checked out."
)
DB_POOL_WAITING = Gauge(
    "chronoplane_db_pool_connections_waiting", "Callers waiting for a database pool connection."
)


class TaskMetrics:
    """The scheduling counters and the lateness histogram: with a ``task`` label, or
    without. Registered when made; ``unregister`` takes them out again."""

    def __init__(self, *, task_labels: bool) -> None:
        self.task_labels = task_labels
        task = ["task"] if task_labels else []
        self.fires = Counter(
            "chronoplane_fires_total", "Scheduled fires recorded as executions.", task
        )
        self.manual_runs = Counter(
            "chronoplane_manual_runs_total", "Executions made by TriggerJob or BackfillJob.", task
        )
        self.lateness = Histogram(
            "chronoplane_fire_lateness_seconds",
            "Start time minus scheduled time of executions that start.",
            task,
            buckets=_LATENESS_BUCKETS,
        )
        self.finished = Counter(
            "chronoplane_executions_finished_total",
            "Executions that reached a final state.",
            ["state", "executor", *task],
        )
        self.missed = Counter(
            "chronoplane_fires_missed_total", "Fires recorded in MISSED records.", task
        )
        self.skipped = Counter("chronoplane_fires_skipped_total", "Fires recorded SKIPPED.", task)
        self.retries = Counter("chronoplane_retries_total", "Retry attempts queued.", task)

    def _all(self) -> Iterable[Any]:
        return (
            self.fires,
            self.manual_runs,
            self.lateness,
            self.finished,
            self.missed,
            self.skipped,
            self.retries,
        )

    def unregister(self) -> None:
        for metric in self._all():
            REGISTRY.unregister(metric)

    def _of(self, metric: Any, task: str, *labels: str) -> Any:
        if self.task_labels:
            return metric.labels(*labels, task)
        return metric.labels(*labels) if labels else metric

    def fired(self, task: str, count: int = 1) -> None:
        self._of(self.fires, task).inc(count)

    def manual(self, task: str, count: int = 1) -> None:
        self._of(self.manual_runs, task).inc(count)

    def late(self, task: str, seconds: float) -> None:
        self._of(self.lateness, task).observe(seconds)

    def ended(self, task: str, state: str, executor: str, count: int = 1) -> None:
        self._of(self.finished, task, state, executor).inc(count)

    def missed_fires(self, task: str, count: int) -> None:
        self._of(self.missed, task).inc(count)

    def skipped_fires(self, task: str, count: int = 1) -> None:
        self._of(self.skipped, task).inc(count)

    def retried(self, task: str, count: int = 1) -> None:
        self._of(self.retries, task).inc(count)


scheduling = TaskMetrics(task_labels=False)


def use_task_labels(on: bool) -> None:
    """Gives the scheduling metrics a ``task`` label (``--metrics-task-labels``), or takes it
    away; before anything is counted (what was counted is dropped)."""
    global scheduling
    if scheduling.task_labels != on:
        scheduling.unregister()
        scheduling = TaskMetrics(task_labels=on)


def sample_pool(usage: Callable[[], tuple[int, int]]) -> None:
    """The pool gauges read ``usage()`` (in use, waiting) when scraped, from the HTTP
    server's thread: it must only read."""
    DB_POOL_IN_USE.set_function(lambda: usage()[0])
    DB_POOL_WAITING.set_function(lambda: usage()[1])


class MetricsServer:
    """prometheus-client's HTTP server on its own daemon thread, serving the default
    registry at /metrics (any path, in fact), with TLS when given a certificate and key."""

    def __init__(
        self, address: str, *, certfile: str = "", keyfile: str = "", client_ca: str = ""
    ) -> None:
        host, _, port = address.rpartition(":")
        self._server, self._thread = start_http_server(
            int(port),
            addr=host.strip("[]"),
            certfile=certfile or None,
            keyfile=keyfile or None,
            client_cafile=client_ca or None,
            client_auth_required=bool(client_ca),
        )
        self._thread.name = "chronoplane-metrics"
        self.address = f"{host}:{self._server.server_port}"

    def stop(self) -> None:
        """Stops serving; blocks until the server's thread has seen it (up to half a second):
        not from an event loop."""
        self._server.shutdown()
        self._server.server_close()
