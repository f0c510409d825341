"""A recording as a source: its events back into the engine, paced by a clock and a speed.

Serves `live --replay` (demos, traces taken elsewhere, testing the view) without root or bcc.  The clock
is injectable so tests step through a replay frame by frame.
"""

from __future__ import annotations

import time
from typing import IO, Any, Callable, Iterator, Optional

from tcptrace_bpf.events import (
    KA_PROBE,
    KEEPALIVE,
    OWNER,
    RESET_RECV,
    RESET_SENT,
    RETRANSMIT,
    STATE,
    STATE_NUMBERS,
    TIMEWAIT,
    Event,
    errno_number,
)
from tcptrace_bpf.recording import TIMER_EVENTS, read_records

_BATCH = 20000
_TIMER_EVENTS = {name: number for number, name in TIMER_EVENTS.items()}


def _sock(text: Optional[str]) -> int:
    return int(text, 16) if text else 0


def events_from_records(records: Iterator[tuple[int, dict[str, Any]]], meta: dict[str, Any]) -> Iterator[Event]:
    """Events from recording records; the header and footer go into `meta`."""
    owners: dict[int, int] = {}
    for _lineno, rec in records:
        kind = rec["type"]
        if kind == "header":
            meta["header"] = rec
            continue
        if kind == "footer":
            meta["footer"] = rec
            continue
        if kind not in ("transition", "retransmit", "reset", "timewait", "keepalive"):
            continue
        sock = _sock(rec.get("sock"))
        base = dict(ts=float(rec["ts"]), sock=sock, family=rec.get("family") or 0, laddr=rec.get("laddr") or "",
                    lport=rec.get("lport") or 0, raddr=rec.get("raddr") or "", rport=rec.get("rport") or 0,
                    pid=rec.get("pid") or 0, comm=rec.get("comm") or "")
        if rec.get("pid_source") == "io" and rec.get("pid") is not None and owners.get(sock) != rec["pid"]:
            owners[sock] = rec["pid"]
            yield Event(kind=OWNER, **base)
        if kind == "transition":
            yield Event(kind=STATE, old=STATE_NUMBERS[rec["from"]], new=STATE_NUMBERS[rec["to"]],
                        err=errno_number(rec.get("error")), **base)
            if rec["to"] == "CLOSE":
                owners.pop(sock, None)
        elif kind == "timewait":
            yield Event(kind=TIMEWAIT, old=STATE_NUMBERS[rec["substate"]], new=_TIMER_EVENTS[rec["event"]],
                        err=int(rec["left_jiffies"]), **{**base, "sock": _sock(rec["tw"])})
        elif kind == "keepalive":
            yield Event(kind=KEEPALIVE, old=int(rec["unanswered"]), new=KA_PROBE, **base)
        elif kind == "retransmit":
            yield Event(kind=RETRANSMIT, old=STATE_NUMBERS.get(rec.get("state") or "", 0), **base)
        else:
            yield Event(kind=RESET_SENT if rec["direction"] == "sent" else RESET_RECV,
                        old=STATE_NUMBERS.get(rec.get("state") or "", 0), err=-1, **base)


class RecordingSource:
    """Plays a recording.  speed 1.0 is real time, 10 ten times faster, 0 as fast as it can be read."""

    def __init__(self, stream: IO[str], name: str, speed: float = 1.0,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.meta: dict[str, Any] = {}
        self.speed = speed
        self.clock = clock
        self.sleep = sleep
        self._events = events_from_records(read_records(stream, name), self.meta)
        self._next: Optional[Event] = next(self._events, None)  # reads the header into meta too
        self._started = False
        self._t0 = 0.0
        self._last_ts = 0.0
        self.finished = False

    def start(self) -> None:
        self._t0 = self.clock()
        self.finished = self._next is None

    def now(self) -> float:
        if self.speed <= 0:
            return self._last_ts
        return (self.clock() - self._t0) * self.speed

    def poll(self, timeout_ms: int) -> list[Event]:
        out: list[Event] = []
        limit = float("inf") if self.speed <= 0 else self.now()
        while self._next is not None and self._next.ts <= limit and len(out) < _BATCH:
            out.append(self._next)
            self._last_ts = self._next.ts
            self._next = next(self._events, None)
        if self._next is None:
            self.finished = True
        if not out and timeout_ms and self.speed > 0:
            wait = timeout_ms / 1000
            if self._next is not None:
                wait = min(wait, max(0.0, (self._next.ts - limit) / self.speed))
            self.sleep(wait)
        return out

    def lost(self) -> int:
        return int((self.meta.get("footer") or {}).get("lost_events") or 0)

    def close(self) -> None:
        pass
