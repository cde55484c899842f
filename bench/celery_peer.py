"""The bare Celery app ``bench/compare.py`` measures Chronoplane's Celery executor against
(``celery -A celery_peer worker``, with bench/ on PYTHONPATH).

One task, ``peer.add``, that notes when it started and ended. The settings are those a
Chronoplane worker runs with (``chronoplane.celery.Chronoplane`` and
``tests/celery_tasks.py``): ``task_acks_late`` with ``task_reject_on_worker_lost``, a prefetch
of one, the same Redis transport options; and, where Chronoplane writes the result to its own
database, a Redis result backend. Broker and backend come from the environment.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

BROKER = os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")

app = Celery("celery_peer", broker=BROKER, backend=os.environ.get("CELERY_RESULT_BACKEND", BROKER))
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    # As the Chronoplane bench worker has them (celery_dispatch.py, tests/celery_tasks.py).
    broker_transport_options={
        "visibility_timeout": 3600.0,
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    # The results are read once, then left to expire: the broker is shared.
    result_expires=600,
    worker_hijack_root_logger=False,
)


def add(a: int, b: int) -> dict[str, Any]:
    started = time.time()
    return {"sum": a + b, "pid": os.getpid(), "start": started, "end": time.time()}


app.task(name="peer.add")(add)
