"""The driver: a source feeds the engine, the engine's output goes to sinks.  The only loop with a clock.

begin() / step() / end() are the loop's parts, so the live view can run intake on its own thread and tests
can drive it one step at a time; run() is the whole loop for record and trace.  Stopping is cooperative: a
signal handler or the duration sets a flag that the loop checks after each poll (at most POLL_MS).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import signal
import threading
import time
from typing import Any, Callable, ContextManager, Optional, Protocol

from tcptrace_bpf import __version__
from tcptrace_bpf.engine import Engine, Lifecycle
from tcptrace_bpf.events import KIND_NAMES, Event
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
    """finished(lc): the lifecycle is final (for a socket that went on in a timewait socket, when that one
    is gone, up to a minute after the close).  A sink may also define closed(lc), called as soon as the
    close itself is final, to show it without that wait."""

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
        "timers": plan.timers, "hz": plan.hz, "filters": flt.as_dict(),
    }


def engine_for(plan_or_header: Any) -> Engine:
    """An engine that knows whether timewait sockets and keepalive are followed (plan, or recording header)."""
    get = plan_or_header.get if isinstance(plan_or_header, dict) else (lambda k: getattr(plan_or_header, k, None))
    return Engine(timers=bool(get("timers")), hz=get("hz") or 250)


class Tracer:
    def __init__(self, source: Source, sinks: list[Sink], engine: Optional[Engine] = None,
                 lock: Optional[threading.Lock] = None) -> None:
        self.source = source
        self.sinks = sinks
        self.engine = engine or Engine()
        self.stop_reason: Optional[str] = None
        # Held while the engine changes, so a reader on another thread (the live view) sees whole batches.
        self._lock: ContextManager[Any] = lock if lock is not None else contextlib.nullcontext()
        self._seen_lost = 0
        self._cpu_start = os.times()
        self._closed_hooks = [sink.closed for sink in sinks if hasattr(sink, "closed")]

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def install_signal_handlers(self) -> None:
        def handler(signum: int, _frame: Any) -> None:
            self.stop(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    def begin(self, header: dict[str, Any]) -> None:
        """Attach (source.start), adopt the sockets that already exist (a source that can list them), and
        only then announce: the header means every probe is in place."""
        self.source.start()
        self._cpu_start = os.times()
        plan = getattr(self.source, "plan", None)
        if plan is not None:  # the plan that loaded: the kernel may have refused the first choice
            header = {**header, "hooks": plan.hooks}
        snapshot = getattr(self.source, "snapshot", None)
        if snapshot is not None:
            with self._lock:
                header = {**header, "preexisting": self.engine.adopt(snapshot(), self.source.now())}
        for sink in self.sinks:
            sink.start(header)

    def step(self, timeout_ms: int = POLL_MS) -> int:
        """One poll: feed what arrived, pass on what became final.  Returns the number of events."""
        engine, sinks, source = self.engine, self.sinks, self.source
        events = source.poll(timeout_ms)
        lost = source.lost()
        with self._lock:
            for ev in events:
                lc = engine.feed(ev)
                for sink in sinks:
                    sink.event(ev, lc)
            if lost != self._seen_lost:
                engine.note_lost(lost - self._seen_lost)
                self._seen_lost = lost
            now = source.now()
            final = engine.advance(now)
            for lc in engine.closed():
                for hook in self._closed_hooks:
                    hook(lc)
            for lc in final:
                for sink in sinks:
                    sink.finished(lc)
        for sink in sinks:
            sink.tick(now)
        return len(events)

    def end(self) -> dict[str, Any]:
        """Drain, write every still-open socket as open, close the source, write the footer."""
        try:
            self.step(0)
            with self._lock:
                for lc in self.engine.closed():
                    for hook in self._closed_hooks:
                        hook(lc)
                for lc in self.engine.finish():
                    for sink in self.sinks:
                        sink.finished(lc)
            now = self.source.now()
            lost_detail = getattr(self.source, "lost_detail", None)
            detail = lost_detail() if lost_detail is not None else {}
        finally:
            self.source.close()
        cpu = os.times()
        engine = self.engine
        footer = {
            "ts": round(now, 6), "reason": self.stop_reason, "lost_events": engine.lost, "events": engine.events,
            "events_by_kind": {KIND_NAMES.get(k, str(k)): n for k, n in sorted(engine.by_kind.items())},
            **detail, "gaps": engine.gaps, "evicted": engine.evicted,
            "cpu_seconds": round((cpu.user - self._cpu_start.user) + (cpu.system - self._cpu_start.system), 3),
        }
        for sink in self.sinks:
            sink.close(footer)
        return footer

    def run(self, header: dict[str, Any], duration: Optional[float] = None,
            on_ready: Optional[Callable[[], None]] = None) -> dict[str, Any]:
        """Trace until stop() or `duration` seconds; returns the footer it wrote."""
        self.begin(header)
        if on_ready:
            on_ready()
        started = time.monotonic()
        try:
            while self.stop_reason is None:
                self.step()
                if duration is not None and time.monotonic() - started >= duration:
                    self.stop("duration")
        except BaseException:
            self.source.close()
            raise
        return self.end()
