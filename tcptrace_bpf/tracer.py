"""The driver: a source feeds the engine, the engine's output goes to sinks.  The only loop with a clock.

Stopping is cooperative: a signal handler or the duration sets a flag the loop checks after each poll
(at most POLL_MS), then everything still open is written as open and the footer closes the recording.
"""

from __future__ import annotations

import datetime
import os
import platform
import signal
import time
from typing import Any, Callable, Optional, Protocol

from tcptrace_bpf import __version__
from tcptrace_bpf.engine import Engine, Lifecycle
from tcptrace_bpf.events import Event
from tcptrace_bpf.filters import Filter
from tcptrace_bpf.plan import Plan

POLL_MS = 100


class Source(Protocol):
    def start(self) -> None: ...
    def now(self) -> float: ...
    def poll(self, timeout_ms: int) -> list[Event]: ...
    def lost(self) -> int: ...
    def close(self) -> None: ...


class Sink(Protocol):
    def start(self, header: dict[str, Any]) -> None: ...
    def event(self, ev: Event, lc: Optional[Lifecycle]) -> None: ...
    def finished(self, lc: Lifecycle) -> None: ...
    def tick(self, now: float) -> None: ...
    def close(self, footer: dict[str, Any]) -> None: ...


def header(plan: Plan, flt: Filter) -> dict[str, Any]:
    """What a recording says about itself: tool, kernel, hook plan (which hook serves which fact), filters."""
    return {
        "tool": "tcptrace-bpf", "version": __version__, "kernel": platform.release(),
        "host": platform.node(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "clock": "seconds since the recording started (CLOCK_MONOTONIC)", "hooks": plan.hooks,
        "filters": flt.as_dict(),
    }


class Tracer:
    def __init__(self, source: Source, sinks: list[Sink], engine: Optional[Engine] = None) -> None:
        self.source = source
        self.sinks = sinks
        self.engine = engine or Engine()
        self.stop_reason: Optional[str] = None

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def run(self, header: dict[str, Any], duration: Optional[float] = None,
            on_ready: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """Trace until stop() or `duration` seconds; returns the footer it wrote."""
        engine, sinks, source = self.engine, self.sinks, self.source
        source.start()
        for sink in sinks:
            sink.start(header)
        if on_ready:
            on_ready()
        seen_lost = 0
        started = time.monotonic()
        cpu_start = os.times()
        try:
            while self.stop_reason is None:
                for ev in source.poll(POLL_MS):
                    lc = engine.feed(ev)
                    for sink in sinks:
                        sink.event(ev, lc)
                lost = source.lost()
                if lost != seen_lost:
                    engine.note_lost(lost - seen_lost)
                    seen_lost = lost
                now = source.now()
                for lc in engine.advance(now):
                    for sink in sinks:
                        sink.finished(lc)
                for sink in sinks:
                    sink.tick(now)
                if duration is not None and time.monotonic() - started >= duration:
                    self.stop("duration")
            # Drain what is already in the buffer, then close what remains.
            for ev in source.poll(0):
                lc = engine.feed(ev)
                for sink in sinks:
                    sink.event(ev, lc)
            engine.note_lost(source.lost() - seen_lost)
            now = source.now()
            for lc in engine.finish():
                for sink in sinks:
                    sink.finished(lc)
        finally:
            source.close()
        cpu = os.times()
        footer = {
            "ts": round(now, 6), "reason": self.stop_reason, "lost_events": engine.lost, "events": engine.events,
            "gaps": engine.gaps, "evicted": engine.evicted,
            "cpu_seconds": round((cpu.user - cpu_start.user) + (cpu.system - cpu_start.system), 3),
        }
        for sink in sinks:
            sink.close(footer)
        return footer
