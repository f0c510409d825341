"""The pure engine: events in, lifecycles out.

No I/O and no clock of its own: the caller feeds events (from the kernel, a recording or a snapshot) and
tells it the time with advance().  The same engine therefore serves record, report, replay and the live view,
and is tested with synthetic streams.

Facts the engine leans on (each checked against the kernel, see README "How it works"):
- A socket's identity is its kernel address while it lives; the address is reused after free, so a birth
  transition (CLOSE -> X, or LISTEN -> SYN_RECV for an accepted child) always starts a new lifecycle.
- Some facts about a close arrive just *after* the ->CLOSE transition (an abortive close sets CLOSE, then
  sends its RST).  A closed lifecycle therefore waits `grace` seconds of source time before it is final.
- The tracepoint never shows TIME_WAIT: a socket handed to the timewait socket shows FIN_WAIT2 -> CLOSE or
  CLOSING -> CLOSE.  Without a reset or an error that is TIME_WAIT entered, recorded as inferred.
- The task running at a transition is the owner only for transitions that run in the owner's own syscall
  (connect, listen, close/shutdown); I/O hooks (6.3+) give the owner too.  Others are never trusted.
"""

from __future__ import annotations

import errno
from typing import NamedTuple, Optional

from tcptrace_bpf.events import (
    CLOSE,
    CLOSE_WAIT,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT1,
    FIN_WAIT2,
    LAST_ACK,
    LISTEN,
    OWNER,
    RESET_RECV,
    RESET_SENT,
    RETRANSMIT,
    STATE,
    SYN_RECV,
    SYN_SENT,
    TIME_WAIT,
    Event,
)

GRACE = 0.25
CLOSE_KINDS = ("active", "passive", "simultaneous", "reset", "refused", "timeout", "open", "unknown")

# Transitions that only ever run in the owning task's own system call: (old, new) -> pid source.
_OWNER_TRANSITIONS = {
    (CLOSE, SYN_SENT): "connect",
    (CLOSE, LISTEN): "listen",
    (ESTABLISHED, FIN_WAIT1): "close",
    (SYN_RECV, FIN_WAIT1): "close",
    (CLOSE_WAIT, LAST_ACK): "close",
    (LISTEN, CLOSE): "close",
}
_WILDCARDS = ("", "0.0.0.0", "::")
_RESET_ERRORS = (errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED)


class Interval(NamedTuple):
    """Time spent in one state.  `enter`/`leave` None: not observed.  `source` says how it was measured:
    exact (both ends are kernel events), inferred (an end deduced, not seen: FIN_WAIT2 handed to the
    timewait socket, whose duration is then a lower bound, and TIME_WAIT, whose end is not seen at all),
    partial (the socket existed before the trace: only the end was seen), gap (events were lost around it)."""

    state: int
    enter: Optional[float]
    leave: Optional[float]
    duration: Optional[float]
    source: str


class Lifecycle:
    """One socket lifetime, as raw facts; states and close kind are derived from them on demand."""

    __slots__ = (
        "sock", "family", "laddr", "lport", "raddr", "rport", "pid", "comm", "pid_source", "role", "start",
        "end", "state", "transitions", "retransmits", "resets_sent", "resets_received", "error", "gaps",
        "refused", "sync_reset", "lost_end", "last_ts",
    )

    def __init__(self, sock: int, start: Optional[float], state: int, role: Optional[str]) -> None:
        self.sock = sock
        self.family = 0
        self.laddr = ""
        self.lport = 0
        self.raddr = ""
        self.rport = 0
        self.pid: Optional[int] = None
        self.comm: Optional[str] = None
        self.pid_source: Optional[str] = None
        self.role = role
        self.start = start
        self.end: Optional[float] = None
        self.state = state
        self.transitions: list[tuple[float, int, int]] = []
        self.retransmits = 0
        self.resets_sent = 0
        self.resets_received = 0
        self.error = 0
        self.gaps = 0
        self.refused = False
        self.sync_reset = False
        self.lost_end = False
        self.last_ts = start if start is not None else 0.0

    # --- facts ---------------------------------------------------------------------------------------
    def note_tuple(self, ev: Event) -> None:
        if ev.family:
            self.family = ev.family
        if ev.laddr and (ev.laddr not in _WILDCARDS or not self.laddr):
            self.laddr = ev.laddr
        if ev.lport:
            self.lport = ev.lport
        if ev.raddr and (ev.raddr not in _WILDCARDS or not self.raddr):
            self.raddr = ev.raddr
        if ev.rport:
            self.rport = ev.rport

    def set_owner(self, pid: int, comm: str, source: str) -> None:
        self.pid, self.comm, self.pid_source = pid, comm, source

    # --- derived -------------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.end is not None

    @property
    def timewait(self) -> bool:
        """The socket was handed to a timewait socket (inferred: the tracepoint never shows TIME_WAIT)."""
        if self.end is None or not self.transitions:
            return False
        _ts, old, new = self.transitions[-1]
        return new == CLOSE and old in (FIN_WAIT2, CLOSING) and not self.sync_reset and self.error == 0

    def intervals(self) -> list[Interval]:
        out: list[Interval] = []
        cur: Optional[tuple[int, Optional[float], str]] = None
        tw = self.timewait
        for i, (ts, old, new) in enumerate(self.transitions):
            if i == 0 and self.start is not None:
                cur = (new, ts, "exact")
                continue
            if cur is None:
                cur = (old, None, "partial")
            elif cur[0] != old:
                out.append(Interval(cur[0], cur[1], None, None, "gap"))
                cur = (old, None, "gap")
            state, enter, source = cur
            if tw and new == CLOSE and state == FIN_WAIT2:
                source = "inferred"
            out.append(Interval(state, enter, ts, None if enter is None else ts - enter, source))
            cur = None if new == CLOSE else (new, ts, "exact")
        if tw:
            out.append(Interval(TIME_WAIT, self.end, None, None, "inferred"))
        elif cur is not None:
            out.append(Interval(cur[0], cur[1], None, None, "gap" if self.lost_end else cur[2]))
        return out

    def close_kind(self) -> str:
        if self.end is None:
            return "unknown" if self.lost_end else "open"
        if self.error == errno.ETIMEDOUT:
            return "timeout"
        last_old = self.transitions[-1][1] if self.transitions else self.state
        if last_old == SYN_SENT:
            # RST, or ICMP unreachable (sk_err set); no error at all: the application gave up first.
            return "refused" if (self.refused or self.error) else "active"
        if self.sync_reset or self.error in _RESET_ERRORS:
            return "reset"
        seen = {new for _ts, _old, new in self.transitions}
        if CLOSING in seen:
            return "simultaneous"
        if CLOSE_WAIT in seen:
            return "passive"
        if FIN_WAIT1 in seen or last_old == LISTEN:
            return "active"
        return "unknown"


class Engine:
    """Rebuilds lifecycles from events.  Finished lifecycles come back from advance() and finish()."""

    def __init__(self, grace: float = GRACE, max_sockets: int = 1_000_000) -> None:
        self.grace = grace
        self.max_sockets = max_sockets
        self.open: dict[int, Lifecycle] = {}
        self._closing: dict[int, Lifecycle] = {}
        self._listeners: dict[int, Lifecycle] = {}
        self._owner_hints: dict[int, tuple[int, str]] = {}
        self._early_resets: dict[int, tuple[int, int]] = {}
        self._done: list[Lifecycle] = []
        self.events = 0
        self.gaps = 0
        self.evicted = 0
        self.lost = 0

    # --- intake --------------------------------------------------------------------------------------
    def note_lost(self, count: int) -> None:
        """Events the source could not deliver; lifecycles they touched show gaps."""
        self.lost += count

    def feed(self, ev: Event) -> Optional[Lifecycle]:
        """Apply one event; returns the lifecycle it belongs to (None for facts with no socket)."""
        self.events += 1
        kind = ev.kind
        if kind == STATE:
            return self._state(ev)
        if kind == RETRANSMIT:
            lc = self.open.get(ev.sock)
            if lc is None:
                if not ev.family or not ev.old:
                    return None
                lc = self._midlife(ev, ev.old)
            lc.retransmits += 1
            lc.note_tuple(ev)
            return lc
        if kind in (RESET_RECV, RESET_SENT):
            return self._reset(ev)
        if kind == OWNER:
            lc = self.open.get(ev.sock)
            if lc is None:
                self._hint(ev.sock, ev.pid, ev.comm)
            else:
                lc.set_owner(ev.pid, ev.comm, "io")
            return lc
        return None

    def _state(self, ev: Event) -> Lifecycle:
        sock, old, new = ev.sock, ev.old, ev.new
        lc = self.open.get(sock)
        birth = old == CLOSE or (old == LISTEN and new == SYN_RECV)
        if birth or lc is None:
            if lc is not None:
                self._lose_end(lc)
            pending = self._closing.pop(sock, None)
            if pending is not None:
                self._done.append(pending)
            if birth:
                role = {SYN_SENT: "client", LISTEN: "listener", SYN_RECV: "server"}.get(new)
                lc = Lifecycle(sock, ev.ts, new, role)
                if new == SYN_RECV:
                    listener = self._listeners.get(ev.lport)
                    if listener is not None and listener.pid is not None:
                        lc.set_owner(listener.pid, listener.comm or "", "listener")
                self._track(lc)
            else:
                lc = self._midlife(ev, old)
        elif old != lc.state:
            lc.gaps += 1
            self.gaps += 1
        lc.transitions.append((ev.ts, old, new))
        lc.state = new
        lc.last_ts = ev.ts
        lc.note_tuple(ev)
        source = _OWNER_TRANSITIONS.get((old, new))
        if source is not None:
            lc.set_owner(ev.pid, ev.comm, source)
        if new == LISTEN and lc.lport:
            self._listeners[lc.lport] = lc
        if new == CLOSE:
            lc.end = ev.ts
            lc.error = ev.err
            del self.open[sock]
            self._closing[sock] = lc
            if self._listeners.get(lc.lport) is lc:
                del self._listeners[lc.lport]
        return lc

    def _reset(self, ev: Event) -> Optional[Lifecycle]:
        if not ev.sock:
            return None
        lc = self.open.get(ev.sock) or self._closing.get(ev.sock)
        received = ev.kind == RESET_RECV
        if lc is None:
            # tcp_reset() reports the RST before the ->CLOSE that will create the lifecycle: keep it.
            got, sent = self._early_resets.pop(ev.sock, (0, 0))
            if len(self._early_resets) > 4096:
                self._early_resets.clear()
            self._early_resets[ev.sock] = (got + received, sent + (not received))
            return None
        self._apply_reset(lc, received)
        return lc

    @staticmethod
    def _apply_reset(lc: Lifecycle, received: bool, count: int = 1) -> None:
        if received:
            lc.resets_received += count
        else:
            lc.resets_sent += count
        state = lc.state if lc.state != CLOSE or not lc.transitions else lc.transitions[-1][1]
        if state == SYN_SENT:
            lc.refused = lc.refused or received
        elif state != LISTEN:
            lc.sync_reset = True

    def _midlife(self, ev: Event, state: int) -> Lifecycle:
        """A socket first seen mid-life: it starts in the state it was in, with unknown start."""
        role = "listener" if state == LISTEN else ("server" if ev.lport in self._listeners else None)
        lc = Lifecycle(ev.sock, None, state, role)
        lc.note_tuple(ev)
        hint = self._owner_hints.pop(ev.sock, None)
        if hint is not None:
            lc.set_owner(hint[0], hint[1], "io")
        early = self._early_resets.pop(ev.sock, None)
        if early is not None:
            if early[0]:
                self._apply_reset(lc, True, early[0])
            if early[1]:
                self._apply_reset(lc, False, early[1])
        self._track(lc)
        return lc

    def _track(self, lc: Lifecycle) -> None:
        if len(self.open) >= self.max_sockets:
            oldest = next(iter(self.open))
            del self.open[oldest]
            self.evicted += 1
        self.open[lc.sock] = lc

    def _hint(self, sock: int, pid: int, comm: str) -> None:
        if len(self._owner_hints) > 65536:
            self._owner_hints.clear()
        self._owner_hints[sock] = (pid, comm)

    def _lose_end(self, lc: Lifecycle) -> None:
        """A lifecycle whose socket address was reborn without a ->CLOSE seen: events were lost."""
        lc.lost_end = True
        lc.gaps += 1
        self.gaps += 1
        del self.open[lc.sock]
        self._done.append(lc)

    # --- output --------------------------------------------------------------------------------------
    def advance(self, now: float) -> list[Lifecycle]:
        """Lifecycles that became final by `now` (closed more than `grace` ago, or lost), oldest first."""
        done, self._done = self._done, []
        if self._closing:
            limit = now - self.grace
            for sock, lc in list(self._closing.items()):
                if lc.end is not None and lc.end <= limit:
                    done.append(self._closing.pop(sock))
        return done

    def finish(self) -> list[Lifecycle]:
        """Everything still held, at the end of a trace: closed ones final, open ones as open."""
        done, self._done = self._done, []
        done.extend(self._closing.values())
        done.extend(self.open.values())
        self._closing.clear()
        self.open.clear()
        self._listeners.clear()
        return done

    def lifecycles(self) -> list[Lifecycle]:
        """Every lifecycle not yet returned (open, and closed within the grace period)."""
        return list(self.open.values()) + list(self._closing.values())
