"""Recordings made by the real Recorder from synthetic streams (no kernel needed)."""

from __future__ import annotations

import io

from tcptrace_bpf.engine import Engine
from tcptrace_bpf.filters import NO_FILTER, Filter
from tcptrace_bpf.recording import Recorder


def record(events, end: float, flt: Filter = NO_FILTER, footer: bool = True) -> str:
    out = io.StringIO()
    rec = Recorder(out, flt, {1: "NO_SOCKET"})
    rec.start({"tool": "tcptrace-bpf", "kernel": "6.18-test", "hooks": {"state": "test"}, "filters": flt.as_dict()})
    engine = Engine()
    for ev in events:
        lc = engine.feed(ev)
        rec.event(ev, lc)
        for done in engine.advance(ev.ts):
            rec.finished(done)
    for done in engine.advance(end):
        rec.finished(done)
    if footer:
        for done in engine.finish():
            rec.finished(done)
        rec.close({"ts": end, "reason": "SIGINT", "lost_events": 0, "events": engine.events})
    return out.getvalue()
