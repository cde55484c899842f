"""The event loop's own health: how late it runs its callbacks, and when it stops.

A callback re-armed every ``interval`` measures how late it runs: the loop's lag. A lag past
``report_after`` is a stall (one piece of work held the loop, or the process was paused or
starved of CPU); it is logged with what the loop was running, which a watchdog thread samples
while the loop is silent (the loop itself cannot say: it is the one stuck).

Listeners (``on_stall``) are called from that callback, synchronously, with the stall's
length: they run before any task the stall held up takes its next step (a task resumes in a
later turn of the loop than the timers that wake it). So a process resumed after SIGSTOP can
act on what it missed, such as a lease that lapsed, before its tasks carry on.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable

__all__ = ["GC_THRESHOLDS", "LoopMonitor", "quiet_collector"]

log = logging.getLogger(__name__)

# The garbage collector's thresholds in a server process (CPython's are 700, 10, 10). A full
# collection walks every object the collector tracks and holds the loop meanwhile: in a burst
# of 100,000 fires (the jobs in the timer, their executions in flight) 106 of them took 50 to
# 690 ms each, 36 s in all (measured with gc.callbacks). A young collection every 50,000
# allocations instead of every 700 makes full ones about seventy times rarer; cyclic garbage
# waits longer for them, bounded by the same count.
GC_THRESHOLDS = (50_000, 10, 10)

# The lines of the stalled loop's stack that are logged, innermost last.
STACK_LINES = 12


class LoopMonitor:
    def __init__(
        self,
        *,
        interval: float = 0.1,
        report_after: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval = interval
        self._report_after = report_after
        self._clock = clock
        self._listeners: list[Callable[[float], None]] = []
        self._lag_listeners: list[Callable[[float], None]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._expected = 0.0
        self._last_tick = 0.0
        self._loop_thread = 0
        self._sample: str | None = None
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.max_lag = 0.0
        self.stalls = 0

    def on_stall(self, listener: Callable[[float], None]) -> None:
        """``listener(seconds)`` is called, from the loop, after each stall."""
        self._listeners.append(listener)

    def on_lag(self, listener: Callable[[float], None]) -> None:
        """``listener(seconds)`` is called, from the loop, with each tick's lag (the metrics'
        histogram); it must be quick."""
        self._lag_listeners.append(listener)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._last_tick = self._clock()
        self._expected = self._last_tick + self._interval
        self._handle = loop.call_at(loop.time() + self._interval, self._tick)
        self._stop.clear()
        self._watchdog = threading.Thread(
            target=self._watch, name="chronoplane-loop-watchdog", daemon=True
        )
        self._watchdog.start()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=1.0)
            self._watchdog = None

    def _tick(self) -> None:
        now = self._clock()
        lag = now - self._expected
        self.max_lag = max(self.max_lag, lag)
        for observe in self._lag_listeners:
            observe(max(0.0, lag))
        if lag >= self._report_after:
            self.stalls += 1
            sample, self._sample = self._sample, None
            log.warning(
                "the event loop stalled for %.0f ms%s",
                lag * 1000,
                f"; it was running:\n{sample}" if sample else "",
            )
            for listener in self._listeners:
                try:
                    listener(lag)
                except Exception:
                    log.exception("a stall listener failed")
        self._last_tick = now
        self._expected = now + self._interval
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(loop.time() + self._interval, self._tick)

    def _watch(self) -> None:
        """Samples the loop thread's stack once per stall, while it lasts."""
        sampled_at = 0.0
        while not self._stop.wait(self._interval):
            silent_since = self._last_tick
            if self._clock() - silent_since < self._report_after or sampled_at == silent_since:
                continue
            frame = sys._current_frames().get(self._loop_thread)
            if frame is not None:
                lines = traceback.format_stack(frame)[-STACK_LINES:]
                self._sample = "".join(lines).rstrip()
            sampled_at = silent_since


def quiet_collector() -> None:
    """Sets ``GC_THRESHOLDS``, and moves what start-up made (modules, metadata, descriptors:
    never garbage) out of the collector's walks (``gc.freeze``). For a server process only:
    the thresholds are the process's."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
