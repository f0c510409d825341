"""JSON Lines recordings: the schema (version 1), the writer sink, and a validating reader.

The schema is a contract for later work and outside tools; README.md ("Recording format") documents it.
One object per line; key order is fixed with "type" first.  The writer flushes at least once a second so a
crash loses at most the last second, and never rewrites what it already wrote.
"""

from __future__ import annotations

import json
from typing import IO, Any, Iterator, Optional

from tcptrace_bpf.engine import Lifecycle
from tcptrace_bpf.events import (
    KEEPALIVE,
    RESET_RECV,
    RESET_SENT,
    RETRANSMIT,
    STATE,
    STATE_NAMES,
    STATE_NUMBERS,
    TIMER_CANCEL,
    TIMER_EXPIRE,
    TIMER_START,
    TIMEWAIT,
    Event,
    errno_name,
    state_name,
)
from tcptrace_bpf.filters import NO_FILTER, Filter

SCHEMA = 1
RECORD_TYPES = ("header", "transition", "retransmit", "reset", "timewait", "keepalive", "connection", "footer")
TIMER_EVENTS = {TIMER_START: "start", TIMER_CANCEL: "cancel", TIMER_EXPIRE: "expire"}
EVENT_TYPES = frozenset(("transition", "retransmit", "reset", "timewait", "keepalive"))
_REQUIRED = {
    "timewait": ("ts", "tw", "event", "substate", "left_jiffies"),
    "keepalive": ("ts", "sock", "unanswered"),
    "header": ("schema",),
    "transition": ("ts", "sock", "from", "to"),
    "retransmit": ("ts", "sock"),
    "reset": ("ts", "direction"),
    "connection": ("sock", "states", "close"),
    "footer": ("lost_events",),
}


class RecordingError(Exception):
    """A recording line that is not valid; the message names file:line."""


def sock_id(sock: int) -> Optional[str]:
    """Kernel socket address as hex text: exact in every JSON reader (it does not fit a double).
    None for a socket known only from the snapshot (its address is not in sock_diag)."""
    return f"0x{sock:x}" if sock > 0 else None


def _r(ts: Optional[float]) -> Optional[float]:
    return None if ts is None else round(ts, 6)


def event_record(ev: Event, lc: Optional[Lifecycle], reasons: dict[int, str]) -> Optional[dict[str, Any]]:
    """The per-event record (transition, retransmit, reset), with the socket's tuple and owner as known."""
    who = lc if lc is not None else ev
    rec: dict[str, Any]
    if ev.kind == STATE:
        rec = {"type": "transition", "ts": _r(ev.ts), "sock": sock_id(ev.sock),
               "from": state_name(ev.old), "to": state_name(ev.new)}
    elif ev.kind == RETRANSMIT:
        state = lc.state if lc is not None else ev.old
        rec = {"type": "retransmit", "ts": _r(ev.ts), "sock": sock_id(ev.sock),
               "state": state_name(state) if state else None}
    elif ev.kind in (RESET_SENT, RESET_RECV):
        rec = {"type": "reset", "ts": _r(ev.ts), "sock": sock_id(ev.sock) if ev.sock else None,
               "direction": "sent" if ev.kind == RESET_SENT else "received",
               "state": state_name(lc.state) if lc is not None else (state_name(ev.old) if ev.old else None)}
        if ev.kind == RESET_SENT and ev.err >= 0:
            rec["reason"] = reasons.get(ev.err, str(ev.err))
    elif ev.kind == TIMEWAIT:
        rec = {"type": "timewait", "ts": _r(ev.ts), "tw": sock_id(ev.sock), "event": TIMER_EVENTS.get(ev.new),
               "substate": state_name(ev.old), "left_jiffies": ev.err,
               "sock": sock_id(lc.sock) if lc is not None else None}
    elif ev.kind == KEEPALIVE:
        rec = {"type": "keepalive", "ts": _r(ev.ts), "sock": sock_id(ev.sock), "unanswered": ev.old}
    else:
        return None
    rec.update(family=who.family or None, laddr=who.laddr or None, lport=who.lport or None,
               raddr=who.raddr or None, rport=who.rport or None)
    if lc is not None:
        rec.update(pid=lc.pid, comm=lc.comm, pid_source=lc.pid_source)
    else:
        rec.update(pid=None, comm=None, pid_source=None)
    if ev.kind == STATE and ev.err:
        rec["error"] = errno_name(ev.err)
    return rec


def _num(value: Optional[float]) -> str:
    """A time or duration as JSON text: to the microsecond (the same number round(value, 6) gives, written
    with six decimals: formatting is several times cheaper than round() and repr()), null when unknown."""
    return "null" if value is None else f"{value:.6f}"


def _int(value: Optional[int]) -> str:
    return "null" if value is None else str(value)


def connection_line(lc: Lifecycle) -> str:
    """The connection record (one per socket lifetime) as JSON text, built without json.dumps because one is
    written per socket at connection-storm rates.  Strings go through json.dumps (memoised), so escaping is
    the json module's; README.md ("Recording format") documents the keys, in this order."""
    states = ", ".join(
        f'{{"state": {_STATE_JSON.get(iv.state) or _j(state_name(iv.state))}, "enter": {_num(iv.enter)}, '
        f'"leave": {_num(iv.leave)}, "duration": {_num(iv.duration)}, "source": {_j(iv.source)}}}'
        for iv in lc.intervals())
    return (
        f'{{"type": "connection", "sock": {_hex(lc.sock)}, "family": {lc.family or "null"}, '
        f'"laddr": {_j(lc.laddr or None)}, "lport": {lc.lport or "null"}, "raddr": {_j(lc.raddr or None)}, '
        f'"rport": {lc.rport or "null"}, "pid": {_int(lc.pid)}, "comm": {_j(lc.comm)}, '
        f'"pid_source": {_j(lc.pid_source)}, "role": {_j(lc.role)}, "start": {_num(lc.start)}, '
        f'"end": {_num(lc.end)}, "states": [{states}], "retransmits": {lc.retransmits}, '
        f'"resets_sent": {lc.resets_sent}, "resets_received": {lc.resets_received}, '
        f'"keepalive_probes": {_int(lc.keepalive_probes)}, '
        f'"keepalive_unanswered": {_int(lc.keepalive_unanswered)}, '
        f'"close": {_j(lc.close_kind())}, "error": {_j(errno_name(lc.error))}, '
        f'"time_wait": {"true" if lc.timewait else "false"}, "time_wait_end": {_j(lc.tw_end_how)}, '
        f'"tw": {_hex(lc.tw)}, "gaps": {lc.gaps}}}\n'
    )


_json_cache: dict[Any, str] = {}


def _j(value: Any) -> str:
    """JSON text of a small value (comm, address, state name, None), memoised: few distinct values recur.
    Not for numbers or booleans: True and 1 are the same key."""
    text = _json_cache.get(value)
    if text is None:
        text = json.dumps(value)
        if len(_json_cache) > 65536:
            _json_cache.clear()
        _json_cache[value] = text
    return text


_STATE_JSON = {num: json.dumps(name) for num, name in STATE_NAMES.items()}


def _hex(sock: Optional[int]) -> str:
    """sock_id() as JSON text: null for no socket and for one known only from the snapshot (negative)."""
    return f'"0x{sock:x}"' if sock is not None and sock > 0 else "null"


def _who(ev: Event, lc: Optional[Lifecycle]) -> str:
    """The socket's tuple and owner as JSON members, as event_record() writes them after its own keys."""
    who = lc if lc is not None else ev
    text = (f'"family": {who.family or "null"}, "laddr": {_j(who.laddr or None)}, "lport": {who.lport or "null"}, '
            f'"raddr": {_j(who.raddr or None)}, "rport": {who.rport or "null"}, ')
    if lc is None:
        return text + '"pid": null, "comm": null, "pid_source": null'
    return text + (f'"pid": {"null" if lc.pid is None else lc.pid}, "comm": {_j(lc.comm)}, '
                   f'"pid_source": {_j(lc.pid_source)}')


def transition_line(ev: Event, lc: Optional[Lifecycle]) -> str:
    """A transition record as text, built without json.dumps: the one record written per state change, so
    the hot path of recording.  Same keys, order and values as event_record() (tests check they agree)."""
    line = (f'{{"type": "transition", "ts": {ev.ts:.6f}, "sock": "0x{ev.sock:x}", '
            f'"from": {_STATE_JSON.get(ev.old) or _j(state_name(ev.old))}, '
            f'"to": {_STATE_JSON.get(ev.new) or _j(state_name(ev.new))}, {_who(ev, lc)}')
    if ev.err:
        line += f', "error": {_j(errno_name(ev.err))}'
    return line + "}\n"


def timewait_line(ev: Event, lc: Optional[Lifecycle]) -> str:
    """A timewait record as text (one or two per connection that ends in TIME_WAIT), like transition_line."""
    return (f'{{"type": "timewait", "ts": {ev.ts:.6f}, "tw": {_hex(ev.sock)}, '
            f'"event": {_j(TIMER_EVENTS.get(ev.new))}, '
            f'"substate": {_STATE_JSON.get(ev.old) or _j(state_name(ev.old))}, '
            f'"left_jiffies": {ev.err}, "sock": {_hex(lc.sock if lc is not None else None)}, {_who(ev, lc)}}}\n')


class Recorder:
    """Sink writing a recording.  Records pass the filter per socket (partially known sockets pass)."""

    def __init__(self, out: IO[str], flt: Filter = NO_FILTER, reasons: Optional[dict[int, str]] = None) -> None:
        self.out = out
        self.filter = flt
        self.reasons = reasons or {}
        self.connections = 0
        self._last_flush = 0.0

    def _write(self, rec: dict[str, Any]) -> None:
        self.out.write(json.dumps(rec, separators=(", ", ": ")) + "\n")

    def start(self, header: dict[str, Any]) -> None:
        self._write({"type": "header", "schema": SCHEMA, **header})
        self.out.flush()

    def event(self, ev: Event, lc: Optional[Lifecycle]) -> None:
        # A lifecycle may still be learning its tuple (partial); an event without one carries its whole tuple.
        if not self.filter.empty and not (self.filter.match(lc, partial=True) if lc is not None
                                          else self.filter.match(ev)):
            return
        if ev.kind == STATE:
            self.out.write(transition_line(ev, lc))
            return
        if ev.kind == TIMEWAIT:
            self.out.write(timewait_line(ev, lc))
            return
        rec = event_record(ev, lc, self.reasons)
        if rec is not None:
            self._write(rec)

    def finished(self, lc: Lifecycle) -> None:
        if self.filter.empty or self.filter.match(lc):
            self.connections += 1
            self.out.write(connection_line(lc))

    def tick(self, now: float) -> None:
        if now - self._last_flush >= 0.5:
            self.out.flush()
            self._last_flush = now

    def close(self, footer: dict[str, Any]) -> None:
        self._write({"type": "footer", **footer})
        self.out.flush()


def read_records(lines: IO[str], name: str, skim: frozenset[str] = frozenset()
                 ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each line; RecordingError names file:line for a bad one.

    A last line without its newline that does not parse is what a crash leaves: it is reported through a
    final (lineno, {"type": "truncated", ...}) item instead of an error.  Lines of the types in `skim` are
    only checked for shape (our writer's prefix and a closing brace) and come back as {"type", "ts"}: for a
    reader that does not need them, at a fraction of the cost of parsing.
    """
    lineno = 0
    pending: Optional[str] = None
    for line in lines:
        if pending is not None:
            yield _parse(pending, name, lineno)
            pending = None
        lineno += 1
        if skim and line.startswith('{"type": "') and line.endswith("}\n"):
            end = line.find('"', 10)
            kind = line[10:end]
            if kind in skim and line.startswith('", "ts": ', end):
                comma = line.find(",", end + 9)
                try:
                    yield lineno, {"type": kind, "ts": float(line[end + 9:comma])}
                    continue
                except ValueError:
                    pass
        pending = line
    if pending is None:
        return
    if not pending.endswith("\n"):
        try:
            yield _parse(pending, name, lineno)
        except RecordingError:
            yield lineno, {"type": "truncated", "text": pending[:80]}
        return
    yield _parse(pending, name, lineno)


def _parse(line: str, name: str, lineno: int) -> tuple[int, dict[str, Any]]:
    try:
        rec = json.loads(line)
    except ValueError as exc:
        raise RecordingError(f"{name}:{lineno}: not JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise RecordingError(f"{name}:{lineno}: not a JSON object")
    kind = rec.get("type")
    if kind not in _REQUIRED:
        raise RecordingError(f"{name}:{lineno}: unknown record type {kind!r}")
    missing = [key for key in _REQUIRED[kind] if key not in rec]
    if missing:
        raise RecordingError(f"{name}:{lineno}: {kind} record lacks {', '.join(missing)}")
    if kind == "header" and rec["schema"] != SCHEMA:
        raise RecordingError(f"{name}:{lineno}: schema {rec['schema']!r} is not supported (this is {SCHEMA})")
    if kind == "timewait" and (rec["event"] not in TIMER_EVENTS.values() or rec["substate"] not in STATE_NUMBERS):
        raise RecordingError(f"{name}:{lineno}: bad timewait record")
    if kind == "transition" and (rec["from"] not in STATE_NUMBERS or rec["to"] not in STATE_NUMBERS):
        raise RecordingError(f"{name}:{lineno}: unknown TCP state in transition")
    if kind == "connection" and not isinstance(rec["states"], list):
        raise RecordingError(f"{name}:{lineno}: connection states is not a list")
    return lineno, rec
