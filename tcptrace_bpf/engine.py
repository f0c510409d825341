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
  CLOSING -> CLOSE.  With the timer hooks (timers=True) the timewait socket itself is followed: its timer
  starts microseconds before that ->CLOSE with the same 4-tuple, its substate says FIN_WAIT2 or TIME_WAIT,
  and its end (expiry, or a cancel with nothing after it) closes the lifecycle for good.  A re-arm can be
  silent, but every timer event carries the jiffies left, and the TIME_WAIT timer is always 60 s, so the
  FIN_WAIT2 -> TIME_WAIT instant is placed to the jiffy.  Without the timer hooks, TIME_WAIT entry is
  inferred from the ->CLOSE with no reset and no error.
- The task running at a transition is the owner only for transitions that run in the owner's own syscall
  (connect, listen, close/shutdown); I/O hooks (6.3+) give the owner too.  Others are never trusted.
"""

from __future__ import annotations

import errno
from typing import Any, Iterable, NamedTuple, Optional

from tcptrace_bpf.events import (
    CLOSE,
    CLOSE_WAIT,
    CLOSING,
    ESTABLISHED,
    FIN_WAIT1,
    FIN_WAIT2,
    KEEPALIVE,
    LAST_ACK,
    LISTEN,
    OWNER,
    RESET_RECV,
    RESET_SENT,
    RETRANSMIT,
    STATE,
    SYN_RECV,
    SYN_SENT,
    TCP_TIMEWAIT_LEN,
    TIME_WAIT,
    TIMER_CANCEL,
    TIMER_EXPIRE,
    TIMER_START,
    TIMEWAIT,
    Event,
)

GRACE = 0.25
CLOSE_KINDS = ("active", "passive", "simultaneous", "reset", "refused", "timeout", "open", "unknown")
TIME_WAIT_ENDS = ("expired", "fin_wait2_timeout", "reset", "reused", "killed", "overflow", "unknown", "untracked")
MAX_TIMEWAIT = 32768  # lifecycles held while their timewait socket lives (~1 KiB each); beyond: written early

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
        "refused", "sync_reset", "lost_end", "last_ts", "tw", "tw_state", "tw_created", "fw2_end", "tw_end",
        "tw_end_how", "tw_hint", "tw_traced", "keepalive_probes", "keepalive_unanswered", "fw2_source",
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
        self.tw: Optional[int] = None  # the inet_timewait_sock that carried on after ->CLOSE
        self.tw_state: Optional[int] = None  # its substate: FIN_WAIT2 or TIME_WAIT
        self.tw_created: Optional[float] = None
        self.fw2_end: Optional[float] = None  # FIN_WAIT2 -> TIME_WAIT inside the timewait socket
        self.fw2_source = "exact"  # or "peer": placed by the local peer sending its FIN, not yet by the timer
        self.tw_end: Optional[float] = None
        self.tw_end_how: Optional[str] = None
        self.tw_hint: Optional[str] = None
        self.tw_traced = False  # timer hooks on: timewait facts are exact, not inferred
        self.keepalive_probes: Optional[int] = None  # None: not traced
        self.keepalive_unanswered: Optional[int] = None

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
        """The socket was handed to a timewait socket: seen (timer hooks) or inferred from its ->CLOSE."""
        return self.tw is not None or (not self.tw_traced and self.closes_into_timewait())

    def closes_into_timewait(self) -> bool:
        """The ->CLOSE is the handoff to a timewait socket: FIN_WAIT2/CLOSING -> CLOSE, no reset, no error."""
        if self.end is None or not self.transitions:
            return False
        _ts, old, new = self.transitions[-1]
        return new == CLOSE and old in (FIN_WAIT2, CLOSING) and not self.sync_reset and self.error == 0

    def phase(self) -> tuple[int, Optional[float]]:
        """(state now, since when): a timewait socket's substate counts as the state."""
        if self.tw_state is not None and self.tw_end is None:
            since = self.fw2_end if self.tw_state == TIME_WAIT and self.fw2_end is not None else None
            if since is None:
                since = self.end if self.tw_state == TIME_WAIT else self._fw2_enter()
            return self.tw_state, since
        return self.state, (self.transitions[-1][0] if self.transitions else None)

    def _fw2_enter(self) -> Optional[float]:
        for ts, _old, new in reversed(self.transitions):
            if new == FIN_WAIT2:
                return ts
        return self.end

    def intervals(self) -> list[Interval]:
        if not self.transitions and self.start is None:
            return self._intervals_preexisting()
        if self.tw is not None:
            return self._intervals_exact_tw()
        return self._socket_intervals(self.timewait)

    def _socket_intervals(self, inferred_tw: bool) -> list[Interval]:
        """The full socket's states from its transitions; inferred_tw: its close was the handoff to a timewait
        socket not followed by the timer hooks (FIN_WAIT2 then a lower bound, TIME_WAIT entered, no end)."""
        out: list[Interval] = []
        cur: Optional[tuple[int, Optional[float], str]] = None
        tw = inferred_tw
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

    def _intervals_preexisting(self) -> list[Interval]:
        """A socket from the snapshot that has not changed state since: one interval, its start unseen.
        A timewait socket's TIME_WAIT start is known from its timer (60 s minus the time left: polled)."""
        if self.tw_state is None:
            return [Interval(self.state, None, None, None, "partial")]
        out = []
        if self.fw2_end is None or self.fw2_source != "polled":
            leave = self.fw2_end if self.fw2_end is not None else (self.tw_end if self.tw_state == FIN_WAIT2 else None)
            out.append(Interval(FIN_WAIT2, None, leave, None, "partial"))
        if self.fw2_end is not None:
            out.append(Interval(TIME_WAIT, self.fw2_end, self.tw_end,
                                None if self.tw_end is None else self.tw_end - self.fw2_end, self.fw2_source))
        return out

    def _intervals_exact_tw(self) -> list[Interval]:
        """The full socket's states, then the timewait socket's: FIN_WAIT2 runs on inside it until the peer's
        FIN (fw2_end) or its timeout, then TIME_WAIT until expiry or an early end."""
        out = self._socket_intervals(False)
        if out and out[-1].state == FIN_WAIT2 and self.tw_created is not None:
            # the full socket's FIN_WAIT2 went on in the timewait socket (orphan, or close() in FIN_WAIT2)
            last = out.pop()
            if self.fw2_end is not None:
                leave = self.fw2_end
            elif self.tw_end_how == "fin_wait2_timeout" or (self.tw_end is not None and self.tw_state == FIN_WAIT2):
                leave = self.tw_end
            else:
                leave = None
            if self.tw_state == TIME_WAIT and self.fw2_end is None:
                leave = self.end  # created straight in TIME_WAIT: the peer's FIN closed the full socket
            source = self.fw2_source if leave is not None and leave == self.fw2_end else last.source
            out.append(Interval(FIN_WAIT2, last.enter, leave,
                                None if leave is None or last.enter is None else leave - last.enter, source))
        tw_enter = self.fw2_end if self.fw2_end is not None else (self.end if self.tw_state == TIME_WAIT else None)
        if tw_enter is not None:
            source = self.fw2_source if tw_enter == self.fw2_end else "exact"
            out.append(Interval(TIME_WAIT, tw_enter, self.tw_end,
                                None if self.tw_end is None else self.tw_end - tw_enter, source))
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

    def __init__(self, grace: float = GRACE, max_sockets: int = 1_000_000, timers: bool = False,
                 hz: int = 250, max_timewait: int = MAX_TIMEWAIT) -> None:
        self.grace = grace
        self.max_sockets = max_sockets
        self.max_timewait = max_timewait
        self.timers = timers  # the source follows timewait sockets and keepalive probes (timer hooks)
        self.hz = hz
        # timewait sockets: started but not yet matched to their full socket's ->CLOSE (by 4-tuple);
        # closed lifecycles waiting for theirs; and lifecycles living on in one (by tw pointer and tuple)
        self._tw_pending: dict[tuple[str, int, str, int], tuple[float, int, int]] = {}
        self._tw_waiting: dict[tuple[str, int, str, int], Lifecycle] = {}
        self.timewait: dict[int, Lifecycle] = {}
        self._tw_tuple: dict[tuple[str, int, str, int], Lifecycle] = {}
        self._tw_cancels: dict[int, tuple[float, int, int]] = {}
        # a start after a cancel on a held pointer: a re-arm, unless a full socket with the same 4-tuple
        # closes into it (the old timewait socket was killed and its memory reused for the new one)
        self._tw_restarts: dict[int, tuple[float, int, int]] = {}
        self._ka_hints: dict[int, tuple[int, int]] = {}
        self._closed: list[Lifecycle] = []
        self._adopted: dict[tuple[str, int, str, int], Lifecycle] = {}  # snapshot sockets not yet seen live
        self._next_synthetic = -1
        self.open: dict[int, Lifecycle] = {}
        self._closing: dict[int, Lifecycle] = {}
        self._listeners: dict[int, Lifecycle] = {}
        self._owner_hints: dict[int, tuple[int, str]] = {}
        self._early_resets: dict[int, tuple[int, int]] = {}
        self._done: list[Lifecycle] = []
        self.events = 0
        self.by_kind: dict[int, int] = {}
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
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        if kind == STATE:
            return self._state(ev)
        if kind == RETRANSMIT:
            lc = self.open.get(ev.sock) or (self._take_adopted(ev) if self._adopted else None)
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
        if kind == TIMEWAIT:
            return self._timewait(ev)
        if kind == KEEPALIVE:
            lc = self.open.get(ev.sock) or self._closing.get(ev.sock) or (
                self._take_adopted(ev) if self._adopted else None)
            if lc is None:
                count, _unanswered = self._ka_hints.pop(ev.sock, (0, 0))
                if len(self._ka_hints) > 65536:
                    self._ka_hints.clear()
                self._ka_hints[ev.sock] = (count + 1, ev.old)
                return None
            lc.keepalive_probes = (lc.keepalive_probes or 0) + 1
            lc.keepalive_unanswered = ev.old
            return lc
        return None

    # --- sockets that existed before the trace --------------------------------------------------------
    def adopt(self, sockets: Iterable[tuple[Any, Optional[tuple[int, str]]]], now: float) -> int:
        """Sockets from a snapshot (sock_diag) taken once every probe was attached: each starts a lifecycle
        with unknown start, in its current state, owned by the process holding its inode.  The kernel
        address is not in the snapshot: the first live event with the same 4-tuple takes it over."""
        count = 0
        for snap, owner in sockets:
            count += 1
            raddr = "" if snap.raddr == "::" else snap.raddr
            laddr = "" if snap.laddr == "::" else snap.laddr
            key = (laddr, snap.lport, raddr, snap.rport)
            sock, self._next_synthetic = self._next_synthetic, self._next_synthetic - 1
            if snap.timewait:
                lc = Lifecycle(sock, None, CLOSE, None)
                lc.tw_traced, lc.tw_state = self.timers, snap.state
                if snap.state == TIME_WAIT:  # armed for exactly 60 s when TIME_WAIT began
                    lc.fw2_end, lc.fw2_source = now + snap.expires_ms / 1000 - TCP_TIMEWAIT_LEN, "polled"
            else:
                role = "listener" if snap.state == LISTEN else None
                lc = Lifecycle(sock, None, snap.state, role)
                if snap.timer == 2 and self.timers:
                    lc.keepalive_unanswered = snap.probes
            lc.family, lc.laddr, lc.lport, lc.raddr, lc.rport = snap.family, laddr, snap.lport, raddr, snap.rport
            lc.last_ts = now
            if owner is not None:
                lc.set_owner(owner[0], owner[1], "inode")
            if snap.timewait:
                if len(self.timewait) >= self.max_timewait:  # memory stays bounded: not followed, counted
                    self.evicted += 1
                    continue
                self.timewait[sock] = lc
                self._tw_tuple[key] = lc
                continue
            self._track(lc)
            self._adopted[key] = lc
            if snap.state == LISTEN and snap.lport:
                self._listeners.setdefault(snap.lport, lc)
        return count

    def _take_adopted(self, ev: Event) -> Optional[Lifecycle]:
        """A snapshot socket whose 4-tuple this event has: it now goes by its kernel address."""
        lc = self._adopted.pop(self._key(ev), None)
        if lc is not None and self.open.get(lc.sock) is lc:
            del self.open[lc.sock]
            lc.sock = ev.sock
            self.open[ev.sock] = lc
        return lc

    # --- timewait sockets ----------------------------------------------------------------------------
    @staticmethod
    def _key(obj: Any) -> tuple[str, int, str, int]:
        return (obj.laddr, obj.lport, obj.raddr, obj.rport)

    def _timewait(self, ev: Event) -> Optional[Lifecycle]:
        ptr, key = ev.sock, self._key(ev)
        lc = self.timewait.get(ptr)
        if lc is None:
            held = self._tw_tuple.get(key)
            if held is not None and held.tw is None and held.sock < 0:  # from the snapshot: now we know it
                del self.timewait[held.sock]
                held.tw = ptr
                self.timewait[ptr] = lc = held
        if lc is not None and self._key(lc) != key:
            # freed and reused for another timewait socket: the one we followed ended (its cancel was seen)
            self._tw_kill(ptr)
            lc = None
        if ev.new == TIMER_START:
            if lc is None:
                waiting = self._tw_waiting.pop(key, None)
                if waiting is not None:
                    self._tw_attach(waiting, ptr, ev.ts, ev.old)
                    return waiting
                if len(self._tw_pending) > 65536:
                    self._tw_pending.clear()
                self._tw_pending[key] = (ev.ts, ptr, ev.old)
                return None
            if ptr in self._tw_cancels:
                self._tw_restarts[ptr] = (ev.ts, ev.old, ev.err)  # decided by advance() or a ->CLOSE
            else:
                self._tw_substate(lc, ev)
        elif ev.new == TIMER_CANCEL:
            if lc is not None:
                self._tw_rearmed(ptr)
                self._tw_cancels[ptr] = (ev.ts, ev.old, ev.err)
        elif ev.new == TIMER_EXPIRE and lc is not None:
            self._tw_rearmed(ptr)
            self._tw_cancels.pop(ptr, None)  # cancel + expire: the natural end
            self._tw_substate(lc, ev)
            self._tw_finish(lc, ev.ts, "expired" if lc.tw_state == TIME_WAIT else "fin_wait2_timeout")
        return lc

    def _tw_rearmed(self, ptr: int) -> None:
        """A start held back after a cancel turned out to be a re-arm of the same timewait socket."""
        restart = self._tw_restarts.pop(ptr, None)
        lc = self.timewait.get(ptr)
        if restart is None or lc is None:
            return
        self._tw_cancels.pop(ptr, None)
        ts, substate, left = restart
        self._tw_substate(lc, Event(ts, TIMEWAIT, ptr, substate, TIMER_START, err=left))

    def _tw_attach(self, lc: Lifecycle, ptr: int, created: float, substate: int) -> None:
        lc.tw, lc.tw_created, lc.tw_state = ptr, created, substate
        self.timewait[ptr] = lc
        self._tw_tuple[self._key(lc)] = lc
        if len(self.timewait) > self.max_timewait:
            # memory stays bounded: the oldest is written now, its TIME_WAIT open and marked untracked
            oldest = self.timewait[next(iter(self.timewait))]
            self.evicted += 1
            self._tw_finish(oldest, None, "untracked")

    def _tw_substate(self, lc: Lifecycle, ev: Event) -> None:
        """Note the substate a timer event read; place a FIN_WAIT2 -> TIME_WAIT switch not seen as it happened:
        the TIME_WAIT timer is armed for exactly TCP_TIMEWAIT_LEN, so it began `left` jiffies before now + 60 s."""
        if ev.old == TIME_WAIT and (lc.tw_state == FIN_WAIT2 or lc.fw2_source == "peer"):
            lc.fw2_end = ev.ts + ev.err / self.hz - TCP_TIMEWAIT_LEN
            lc.fw2_source = "exact"
        lc.tw_state = ev.old

    def _tw_kill(self, ptr: int) -> None:
        lc = self.timewait.get(ptr)
        if lc is None:
            return
        cancel = self._tw_cancels.pop(ptr, None)
        if cancel is None:
            ts = lc.last_ts
        else:
            ts, substate, left = cancel
            if substate == TIME_WAIT and (lc.tw_state == FIN_WAIT2 or lc.fw2_source == "peer"):
                lc.fw2_end, lc.fw2_source = ts + left / self.hz - TCP_TIMEWAIT_LEN, "exact"
                lc.tw_state = TIME_WAIT
        self._tw_finish(lc, ts, lc.tw_hint or "killed")

    def _tw_finish(self, lc: Lifecycle, ts: Optional[float], how: str) -> None:
        lc.tw_end, lc.tw_end_how = ts, how
        if lc.tw is not None:
            self.timewait.pop(lc.tw, None)
        if self._tw_tuple.get(self._key(lc)) is lc:
            del self._tw_tuple[self._key(lc)]
        if lc.sock not in self._closing or self._closing[lc.sock] is not lc:
            self._done.append(lc)

    def _state(self, ev: Event) -> Lifecycle:
        sock, old, new = ev.sock, ev.old, ev.new
        lc = self.open.get(sock)
        birth = old == CLOSE or (old == LISTEN and new == SYN_RECV)
        if birth or lc is None:
            if lc is not None:
                self._lose_end(lc)
                lc = None
            pending = self._closing.pop(sock, None)
            if pending is not None:  # the address was freed and reused within the grace period
                self._leave_closing(pending, final_check=False)
            if not birth and self._adopted:
                lc = self._take_adopted(ev)
            if lc is not None:
                pass
            elif birth:
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
        if self._adopted and lc.start is not None:
            # born between the probes attaching and the snapshot: the snapshot's copy is this socket
            twin = self._adopted.get(self._key(lc))
            if twin is not None and twin is not lc:
                del self._adopted[self._key(lc)]
                if self.open.get(twin.sock) is twin:
                    del self.open[twin.sock]
        source = _OWNER_TRANSITIONS.get((old, new))
        if source is not None:
            lc.set_owner(ev.pid, ev.comm, source)
        if self._tw_tuple:
            if new in (SYN_RECV, ESTABLISHED):
                held = self._tw_tuple.get(self._key(lc))
                if held is not None and held is not lc:
                    held.tw_hint = "reused"  # a new connection on the same 4-tuple took over the timewait socket
            elif new == LAST_ACK:
                # A local peer sends its FIN: our end in a FIN_WAIT2 timewait socket turns TIME_WAIT now.
                # The timer usually says so only when it ends (a re-arm in the same wheel bucket is silent).
                held = self._tw_tuple.get((lc.raddr, lc.rport, lc.laddr, lc.lport))
                if held is not None and held.tw_state == FIN_WAIT2:
                    held.tw_state, held.fw2_end, held.fw2_source = TIME_WAIT, ev.ts, "peer"
        if new == LISTEN and lc.lport:
            self._listeners[lc.lport] = lc
        if new == CLOSE:
            lc.end = ev.ts
            lc.error = ev.err
            del self.open[sock]
            self._closing[sock] = lc
            if self.timers and old in (FIN_WAIT2, CLOSING):
                key = self._key(lc)
                pending = self._tw_pending.pop(key, None)
                held = self._tw_tuple.get(key)
                if pending is None and held is not None and held is not lc and held.tw in self._tw_restarts:
                    # the older timewait socket on this tuple was killed and its memory reused for ours
                    ptr = held.tw
                    created, substate, _left = self._tw_restarts.pop(ptr)
                    if held.tw_hint is None:
                        held.tw_hint = "reused"
                    self._tw_kill(ptr)
                    pending = (created, ptr, substate)
                if pending is not None:
                    self._tw_attach(lc, pending[1], pending[0], pending[2])
                else:
                    self._tw_waiting[key] = lc
            if self._listeners.get(lc.lport) is lc:
                del self._listeners[lc.lport]
        return lc

    def _reset(self, ev: Event) -> Optional[Lifecycle]:
        if not ev.sock:
            return None
        held = self.timewait.get(ev.sock)
        if held is not None and ev.kind == RESET_SENT:
            held.tw_hint = "reset"  # the timewait socket answered with a RST, and dies
            return held
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
        if self.timers:
            lc.tw_traced = True
            count, unanswered = self._ka_hints.pop(lc.sock, (0, 0))
            lc.keepalive_probes = count
            lc.keepalive_unanswered = unanswered if count else None
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
        """Lifecycles that became final by `now`, oldest first: closed more than `grace` ago (or lost), and,
        for those that went on in a timewait socket, once that socket is gone."""
        limit = now - self.grace
        for ptr, (ts, _substate, _left) in list(self._tw_restarts.items()):
            if ts <= limit:
                self._tw_rearmed(ptr)
        if self._tw_cancels:
            for ptr, (ts, _substate, _left) in list(self._tw_cancels.items()):
                if ts <= limit:  # a cancel with no start or expiry after it: killed early
                    self._tw_kill(ptr)
        if self._closing:
            for sock, lc in list(self._closing.items()):
                if lc.end is not None and lc.end <= limit:
                    del self._closing[sock]
                    self._leave_closing(lc)
        done, self._done = self._done, []
        return done

    def _leave_closing(self, lc: Lifecycle, final_check: bool = True) -> None:
        """The close is final: tell the views; the lifecycle is final too unless a timewait socket goes on.
        A timewait socket that should have started and did not is an overflow (tcp_max_tw_buckets)."""
        self._closed.append(lc)
        if self._tw_waiting.get(self._key(lc)) is lc:
            del self._tw_waiting[self._key(lc)]
            if final_check and lc.tw is None and self.timers and lc.closes_into_timewait():
                lc.tw_end_how = "overflow" if not self.lost else "unknown"
        if lc.tw is None or lc.tw_end_how is not None:
            self._done.append(lc)

    def closed(self) -> list[Lifecycle]:
        """Lifecycles whose close became final since the last call (a view may show them before a timewait
        socket ends, which can take a minute)."""
        out, self._closed = self._closed, []
        return out

    def finish(self) -> list[Lifecycle]:
        """Everything still held, at the end of a trace: closed ones final, open ones as open (and sockets
        still in a timewait socket with that phase open)."""
        for ptr in list(self._tw_restarts):
            self._tw_rearmed(ptr)
        for ptr in list(self._tw_cancels):
            self._tw_kill(ptr)
        done, self._done = self._done, []
        done.extend(self._closing.values())
        done.extend(lc for lc in self.timewait.values() if lc.sock not in self._closing
                    or self._closing[lc.sock] is not lc)
        done.extend(self.open.values())
        for held in (self._closing, self.open, self._listeners, self.timewait, self._tw_tuple, self._tw_waiting,
                     self._tw_pending, self._tw_restarts):
            held.clear()
        self._closed.clear()
        return done

    def lifecycles(self) -> list[Lifecycle]:
        """Every lifecycle not yet returned (open, closed within the grace period, in a timewait socket)."""
        closing = list(self._closing.values())
        return list(self.open.values()) + closing + [lc for lc in self.timewait.values() if lc not in closing]
