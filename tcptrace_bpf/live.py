"""`tcptrace-bpf live`: the full-screen view.  Intake and drawing run on separate threads.

The intake thread runs the tracer (poll, engine, sinks) and never waits for drawing; the UI thread takes a
snapshot under the intake lock (one pass over open sockets, a heap for the rows that fit), renders it
outside the lock, and reads keys.  Drawing is bounded by the screen, not by the number of sockets.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.live import Live

from tcptrace_bpf.diagnose import Diagnoser, HostLimits
from tcptrace_bpf.engine import Engine, Lifecycle
from tcptrace_bpf.events import Event
from tcptrace_bpf.filters import Filter
from tcptrace_bpf.keys import KeyReader
from tcptrace_bpf.tracer import Source, Tracer
from tcptrace_bpf.view import SORTS, STATES, History, Snapshot, render, rows_that_fit, take_snapshot

FRAME_SECONDS = 0.25
RECENT_CLOSES = 50


def host_limits() -> HostLimits:
    """Local port range and tcp_max_tw_buckets of this host (defaults where unreadable)."""
    limits = HostLimits()
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        buckets = int(Path("/proc/sys/net/ipv4/tcp_max_tw_buckets").read_text())
        return HostLimits(port_range=int(high) - int(low) + 1, max_tw_buckets=buckets)
    except (OSError, ValueError):
        return limits


def short_hooks(hooks: dict[str, str]) -> str:
    """One line for the header: the hooks in use (the full plan is in `doctor` and the recording header)."""
    names = re.findall(r"(?:tracepoint|kprobe|fentry) ([\w:/]+)", " ".join(hooks.values()))
    extra = [f"{fact} {hook.split(':')[0]}" for fact, hook in hooks.items() if hook.startswith(("inferred", "replay"))]
    return ", ".join(names + extra)


class LiveSink:
    """Keeps what the view needs beyond the engine: recent closes and the diagnoses' windows."""

    def __init__(self, flt: Filter, limits: HostLimits) -> None:
        self.filter = flt
        self.diagnoser = Diagnoser(limits)
        self.closes: deque[Lifecycle] = deque(maxlen=RECENT_CLOSES)
        self.header: dict[str, Any] = {}

    def start(self, header: dict[str, Any]) -> None:
        self.header = header

    def event(self, ev: Event, lc: Optional[Lifecycle]) -> None:
        if self.filter.empty or (self.filter.match(lc, partial=True) if lc is not None else self.filter.match(ev)):
            self.diagnoser.event(ev, lc)

    def closed(self, lc: Lifecycle) -> None:
        if self.filter.empty or self.filter.match(lc):
            self.closes.appendleft(lc)
            self.diagnoser.finished(lc)

    def finished(self, lc: Lifecycle) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def close(self, footer: dict[str, Any]) -> None:
        pass


class LiveApp:
    def __init__(self, source: Source, flt: Filter, hooks: dict[str, str], extra_sinks: Optional[list[Any]] = None,
                 limits: Optional[HostLimits] = None, started: Optional[float] = None,
                 engine: Optional[Engine] = None) -> None:
        self.lock = threading.Lock()
        self.engine = engine or Engine()
        self.view = LiveSink(flt, limits or host_limits())
        self.tracer = Tracer(source, [self.view, *(extra_sinks or [])], self.engine, self.lock)
        self.filter = flt
        self.hooks = short_hooks(hooks)
        self.history = History()
        self.sort = SORTS[0]
        self.state_filter: Optional[str] = None
        self.paused = False
        self.notice = ""
        self._rows = 20
        self.error: Optional[BaseException] = None
        self._last: Optional[Snapshot] = None
        self._started = started if started is not None else time.monotonic()

    # --- keys ----------------------------------------------------------------------------------------
    def key(self, key: str) -> bool:
        """Apply one key; False means quit."""
        if key in ("q", "Q"):
            return False
        if key == "s":
            self.sort = SORTS[(SORTS.index(self.sort) + 1) % len(SORTS)]
        elif key == "f":
            order = [None, *STATES]
            self.state_filter = order[(order.index(self.state_filter) + 1) % len(order)]
        elif key in ("p", " "):
            self.paused = not self.paused
        return True

    # --- frames --------------------------------------------------------------------------------------
    def snapshot(self, height: int) -> Snapshot:
        """A new snapshot (or the frozen one while paused), sized to `height` lines.

        The intake lock is held only to copy references and read the one-minute windows; the scan over
        open sockets runs outside it (attribute reads are atomic; a frame may mix two adjacent batches).
        """
        if self.paused and self._last is not None:
            self._last.paused = True
            return self._last
        source = self.tracer.source
        with self.lock:
            now = source.now()
            open_sockets = list(self.engine.open.values())
            open_sockets += [lc for lc in self.engine.timewait.values() if lc.tw_end is None]
            closes = list(self.view.closes)
            windows = self.view.diagnoser.diagnose_windows(now)
            lost, events = self.engine.lost, self.engine.events
        lost_detail = getattr(source, "lost_detail", None)  # reads kernel counters: outside the lock
        skipped = lost_detail()["skipped_runs"] if lost_detail is not None else 0
        mine = open_sockets if self.filter.empty else [lc for lc in open_sockets if self.filter.match(lc, True)]
        diagnoses = self.view.diagnoser.diagnose_open(mine, now) + windows
        snap = take_snapshot(
            open_sockets, closes, now, uptime=now, hooks=self.hooks, lost=lost, events=events,
            history=self.history, flt=self.filter, sort=self.sort, state_filter=self.state_filter,
            limit=self._rows, paused=self.paused, diagnoses=diagnoses, skipped=min(skipped, lost))
        snap.notice = self.notice
        self._rows = rows_that_fit(height, len(snap.counts), len(snap.diagnoses))
        self._last = snap
        return snap

    # --- the loops -----------------------------------------------------------------------------------
    def _intake(self) -> None:
        try:
            while self.tracer.stop_reason is None:
                self.tracer.step()
        except BaseException as exc:  # the UI thread stops and run() raises it once the screen is restored
            self.error = exc
            self.tracer.stop("error")

    def run(self, header: dict[str, Any], console: Console, duration: Optional[float] = None) -> dict[str, Any]:
        tracer = self.tracer
        tracer.begin(header)
        plan = getattr(tracer.source, "plan", None)
        if plan is not None:  # the plan that loaded: the kernel may have refused the first choice
            self.hooks = short_hooks(plan.hooks)
        intake = threading.Thread(target=self._intake, name="intake", daemon=True)
        intake.start()

        def on_signal(signum: int, _frame: Any) -> None:
            tracer.stop(signal.Signals(signum).name)
        signal.signal(signal.SIGTERM, on_signal)
        started = time.monotonic()
        try:
            with KeyReader() as keys, Live(console=console, screen=True, auto_refresh=False,
                                           transient=False) as live:
                while tracer.stop_reason is None:
                    began = time.monotonic()
                    snap = self.snapshot(console.size.height)
                    live.update(render(snap), refresh=True)
                    # Drawing gets at most about a quarter of a core, however many sockets there are.
                    key = keys.read(max(FRAME_SECONDS, 3 * (time.monotonic() - began)))
                    if key is not None and not self.key(key):
                        tracer.stop("q")
                    if duration is not None and time.monotonic() - started >= duration:
                        tracer.stop("duration")
        except KeyboardInterrupt:
            tracer.stop("SIGINT")
        intake.join(5)
        footer = tracer.end()
        if self.error is not None:
            raise self.error
        return footer
