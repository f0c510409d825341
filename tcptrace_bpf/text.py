"""Plain-text sink: one line per finished socket lifetime, for `tcptrace-bpf trace` (the main job until the
live view lands) and anywhere a compact timeline helps.

Each state shows its duration with a mark for how it was measured (MARKS; README "Durations and their
sources"): none = exact, `=` peer, `%` polled, `~` inferred, `?` started before the trace, `!` lost events.
"""

from __future__ import annotations

from typing import IO, Any, Optional

from tcptrace_bpf.engine import Interval, Lifecycle
from tcptrace_bpf.events import FIN_WAIT2, TIME_WAIT, Event, state_name
from tcptrace_bpf.filters import NO_FILTER, Filter
from tcptrace_bpf.report import endpoint, fmt_seconds

MARKS = {"exact": "", "peer": "=", "polled": "%", "inferred": "~", "partial": "?", "gap": "!"}
LEGEND = ("durations: exact, = placed by the local peer, % from a socket snapshot, ~ inferred, "
          "? started before the trace, ! events lost around it")


def timeline(intervals: list[Interval]) -> str:
    parts = []
    for iv in intervals:
        mark = MARKS.get(iv.source, "?")
        if iv.duration is not None:
            # an inferred end is where the kernel stopped showing the state: a lower bound
            dur = (">=" if iv.source == "inferred" else "") + fmt_seconds(iv.duration)
        elif iv.leave is None:
            dur = "entered" if iv.state == TIME_WAIT else "open"
        else:
            dur = "?"
        parts.append(f"{state_name(iv.state)} {mark}{dur}")
    return " > ".join(parts)


def describe(lc: Lifecycle) -> str:
    who = f"{lc.comm or '?'}[{lc.pid if lc.pid is not None else '?'}]"
    extra = []
    if lc.retransmits:
        extra.append(f"retrans={lc.retransmits}")
    if lc.resets_sent or lc.resets_received:
        extra.append(f"rst={lc.resets_sent}/{lc.resets_received}")
    tail = (" " + " ".join(extra)) if extra else ""
    remote = endpoint(lc.raddr, lc.rport) if lc.rport else "*"
    return (f"{lc.role or '?':8} {endpoint(lc.laddr, lc.lport)} -> {remote} {who} "
            f"close={lc.close_kind()}{tail} | {timeline(lc.intervals())}")


class TextSink:
    def __init__(self, out: IO[str], flt: Filter = NO_FILTER) -> None:
        self.out = out
        self.filter = flt

    def start(self, header: dict[str, Any]) -> None:
        self.out.write(f"tracing TCP on {header.get('kernel')}; Ctrl-C to stop. {LEGEND}\n")
        for fact, hook in header.get("hooks", {}).items():
            self.out.write(f"  {fact:15} {hook}\n")
        self.out.flush()

    def event(self, ev: Event, lc: Optional[Lifecycle]) -> None:
        pass

    def closed(self, lc: Lifecycle) -> None:
        """Printed at the close, not a minute later when a timewait socket ends (TIME_WAIT shows as open)."""
        if self.filter.empty or self.filter.match(lc):
            self.out.write(f"{lc.end:10.3f} {describe(lc)}\n")

    def finished(self, lc: Lifecycle) -> None:
        if not (self.filter.empty or self.filter.match(lc)):
            return
        if lc.end is None:  # open at the end of the trace
            self.out.write(f"{lc.last_ts:10.3f} {describe(lc)}\n")
        elif lc.tw_end_how is not None and lc.tw is not None:
            # the rest of a socket that went on in a timewait socket, printed as that one ends
            phases = [iv for iv in lc.intervals() if iv.state in (FIN_WAIT2, TIME_WAIT) and iv.leave != lc.end]
            when = lc.tw_end if lc.tw_end is not None else lc.last_ts
            self.out.write(f"{when:10.3f} {lc.role or '?':8} {endpoint(lc.laddr, lc.lport)} -> "
                           f"{endpoint(lc.raddr, lc.rport)} timewait {lc.tw_end_how} | {timeline(phases)}\n")

    def tick(self, now: float) -> None:
        self.out.flush()

    def close(self, footer: dict[str, Any]) -> None:
        lost = footer.get("lost_events", 0)
        self.out.write(f"stopped ({footer.get('reason')}): {footer.get('events')} events, lost {lost}\n")
        self.out.flush()
