"""Timewait sockets and keepalive from timer events (engine with timers=True), on synthetic streams
shaped like what 6.18 emits (timer_start microseconds before the full socket's ->CLOSE, same tuple)."""

from __future__ import annotations

import pytest

from tcptrace_bpf.engine import Engine
from tcptrace_bpf.events import (
    KA_PROBE,
    KEEPALIVE,
    TIME_WAIT,
    TIMER_CANCEL,
    TIMER_EXPIRE,
    TIMER_START,
    TIMEWAIT,
    state_name,
)

from .streams import (
    CLIENT_SK,
    CLOSE,
    ESTABLISHED,
    FIN_WAIT1,
    FIN_WAIT2,
    RESET_SENT,
    SYN_SENT,
    other,
    st,
)

HZ = 250
TW = 0xFFFF0000000AA000
FW2 = FIN_WAIT2


def tw(ts, event, substate, left, ptr=TW, **kw):
    return other(TIMEWAIT, ts, ptr, old=substate, err=left, **kw)._replace(new=event)


def orphan_close(t0=1.0):
    """connect, close() at t0+1 before the peer's FIN: FIN_WAIT1 -> FIN_WAIT2, handed to a timewait socket
    in the FIN_WAIT2 substate (its timer armed for tcp_fin_timeout, 60 s)."""
    sk = CLIENT_SK
    return [
        st(t0, sk, CLOSE, SYN_SENT, pid=100, comm="curl", lport=0), st(t0 + 0.01, sk, SYN_SENT, ESTABLISHED),
        st(t0 + 1.0, sk, ESTABLISHED, FIN_WAIT1, pid=100, comm="curl"),
        st(t0 + 1.02, sk, FIN_WAIT1, FIN_WAIT2),
        tw(t0 + 1.02001, TIMER_START, FW2, 60 * HZ),
        st(t0 + 1.02002, sk, FIN_WAIT2, CLOSE),
    ]


def run(events, until):
    engine = Engine(timers=True, hz=HZ)
    closed, final = [], []
    for ev in events:
        engine.feed(ev)
        final += engine.advance(ev.ts)
        closed += engine.closed()
    final += engine.advance(until)
    closed += engine.closed()
    return engine, closed, final


def states(lc):
    return [(state_name(i.state), i.enter, i.leave, i.source) for i in lc.intervals()]


def test_orphan_fin_wait2_then_time_wait_seen_at_rearm():
    # the peer holds CLOSE_WAIT 0.5 s; its FIN switches the substate and re-arms the timer for 60 s
    events = orphan_close() + [tw(2.52, TIMER_CANCEL, TIME_WAIT, 60 * HZ - 125),
                               tw(2.52, TIMER_START, TIME_WAIT, 60 * HZ)]
    events += [tw(62.53, TIMER_CANCEL, TIME_WAIT, -2), tw(62.53, TIMER_EXPIRE, TIME_WAIT, -2)]
    engine, closed, final = run(events, until=70)
    (lc,) = final
    assert closed == [lc]
    assert lc.tw == TW and lc.tw_end_how == "expired" and lc.close_kind() == "active"
    ivs = lc.intervals()
    assert [state_name(i.state) for i in ivs] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "TIME_WAIT"]
    fw2, tw_iv = ivs[3], ivs[4]
    assert (fw2.enter, fw2.source) == (2.02, "exact") and fw2.leave == pytest.approx(2.52)
    assert fw2.duration == pytest.approx(0.5)
    assert tw_iv.enter == pytest.approx(2.52) and (tw_iv.leave, tw_iv.source) == (62.53, "exact")
    assert engine.timewait == {}


def test_silent_rearm_is_placed_from_the_jiffies_left():
    """The re-arm fell in the same wheel bucket: no event.  At expiry the timer still says when it was set."""
    events = orphan_close() + [tw(63.0, TIMER_CANCEL, TIME_WAIT, -120), tw(63.0, TIMER_EXPIRE, TIME_WAIT, -120)]
    _engine, _closed, (lc,) = run(events, until=70)
    fw2 = lc.intervals()[3]
    # expires = switch + 60 s, and it fired 120 jiffies (0.48 s) late: the switch was at 63.0 - 0.48 - 60
    assert fw2.leave == pytest.approx(2.52) and fw2.duration == pytest.approx(0.5)
    assert lc.intervals()[4].enter == pytest.approx(2.52) and lc.tw_end_how == "expired"


def test_created_in_time_wait_after_shutdown():
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
              st(1.0, sk, ESTABLISHED, FIN_WAIT1, pid=1, comm="a"), st(1.01, sk, FIN_WAIT1, FIN_WAIT2),
              tw(1.4, TIMER_START, TIME_WAIT, 60 * HZ), st(1.40001, sk, FIN_WAIT2, CLOSE),
              tw(61.5, TIMER_CANCEL, TIME_WAIT, -20), tw(61.5, TIMER_EXPIRE, TIME_WAIT, -20)]
    _engine, _closed, (lc,) = run(events, until=70)
    ivs = lc.intervals()
    assert (state_name(ivs[3].state), ivs[3].leave, ivs[3].source) == ("FIN_WAIT2", 1.40001, "exact")
    assert (state_name(ivs[4].state), ivs[4].enter, ivs[4].leave) == ("TIME_WAIT", 1.40001, 61.5)


def test_fin_wait2_timeout_has_no_time_wait():
    events = orphan_close() + [tw(62.0, TIMER_CANCEL, FW2, -5), tw(62.0, TIMER_EXPIRE, FW2, -5)]
    _engine, _closed, (lc,) = run(events, until=70)
    assert lc.tw_end_how == "fin_wait2_timeout"
    assert [state_name(i.state) for i in lc.intervals()][-1] == "FIN_WAIT2"
    assert lc.intervals()[-1].leave == 62.0


def test_killed_early_by_a_reset_from_the_timewait_socket():
    events = orphan_close() + [other(RESET_SENT, 3.0, TW, old=TIME_WAIT, err=9),
                               tw(3.00003, TIMER_CANCEL, FW2, 55 * HZ)]
    _engine, _closed, final = run(events, until=4)
    (lc,) = final
    assert lc.tw_end_how == "reset" and lc.tw_end == pytest.approx(3.00003)
    assert [state_name(i.state) for i in lc.intervals()][-1] == "FIN_WAIT2"


def test_reused_by_a_new_connection_on_the_same_tuple():
    sk2 = CLIENT_SK + 0x100
    events = orphan_close() + [tw(2.5, TIMER_START, TIME_WAIT, 60 * HZ)]
    events += [st(5.0, sk2, CLOSE, SYN_SENT, pid=100, comm="curl", lport=0),
               tw(5.00001, TIMER_CANCEL, TIME_WAIT, int(57.5 * HZ)),
               st(5.0001, sk2, SYN_SENT, ESTABLISHED)]
    _engine, _closed, final = run(events, until=6)
    old = next(lc for lc in final if lc.sock == CLIENT_SK)
    assert old.tw_end_how == "reused" and old.intervals()[-1].leave == pytest.approx(5.00001)


def test_killed_without_a_cause_seen():
    events = orphan_close() + [tw(2.5, TIMER_START, TIME_WAIT, 60 * HZ), tw(9.0, TIMER_CANCEL, TIME_WAIT, 0)]
    _engine, _closed, (lc,) = run(events, until=10)
    assert lc.tw_end_how == "killed"


def test_pointer_reused_for_another_timewait_socket():
    events = orphan_close() + [tw(2.5, TIMER_START, TIME_WAIT, 60 * HZ), tw(7.0, TIMER_CANCEL, TIME_WAIT, 0),
                               tw(7.00001, TIMER_START, TIME_WAIT, 60 * HZ, rport=9999)]
    _engine, _closed, final = run(events, until=7.1)
    (lc,) = final
    assert lc.tw_end_how == "killed" and lc.tw_end == 7.0


def test_still_in_time_wait_at_the_end_of_the_trace():
    engine, closed, final = run(orphan_close() + [tw(2.5, TIMER_START, TIME_WAIT, 60 * HZ)], until=5)
    assert final == [] and len(closed) == 1 and list(engine.timewait) == [TW]
    (lc,) = engine.finish()
    assert lc.tw_end is None and lc.tw_end_how is None
    assert lc.intervals()[-1][1:] == (2.5, None, None, "exact")
    assert lc.phase() == (TIME_WAIT, 2.5)


def test_no_timewait_socket_means_overflow():
    events = orphan_close()[:4] + [st(2.02002, CLIENT_SK, FIN_WAIT2, CLOSE)]
    _engine, _closed, (lc,) = run(events, until=5)
    assert lc.tw is None and not lc.timewait and lc.tw_end_how == "overflow"
    assert [state_name(i.state) for i in lc.intervals()][-1] == "FIN_WAIT2"


def test_timer_start_after_close_still_attaches():
    events = orphan_close()
    events[4], events[5] = events[5], events[4]
    _engine, _closed, _final = run(events, until=3)
    assert _engine.timewait[TW].sock == CLIENT_SK


def test_keepalive_probes_counted_and_timeout():
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED)]
    events += [other(KEEPALIVE, 1.1 + i, sk, old=n)._replace(new=KA_PROBE) for i, n in enumerate((1, 1, 1, 2))]
    events += [other(RESET_SENT, 5.2, sk, old=ESTABLISHED, err=15), st(5.2, sk, ESTABLISHED, CLOSE, err=110)]
    _engine, _closed, (lc,) = run(events, until=9)
    assert lc.keepalive_probes == 4 and lc.keepalive_unanswered == 2 and lc.close_kind() == "timeout"


def test_without_timer_hooks_keepalive_is_not_measured():
    engine = Engine()
    lc = engine.feed(st(0, CLIENT_SK, CLOSE, SYN_SENT, pid=1, comm="a"))
    assert lc.keepalive_probes is None and not lc.tw_traced


def test_local_peer_fin_places_the_switch_until_the_timer_confirms():
    from .streams import CLOSE_WAIT, LAST_ACK, SERVER_SK

    peer = dict(laddr="10.0.0.2", lport=80, raddr="10.0.0.1", rport=40000)
    events = orphan_close() + [st(2.5199, SERVER_SK, CLOSE_WAIT, LAST_ACK, pid=7, comm="srv", **peer)]
    engine, _closed, _final = run(events, until=3)
    lc = engine.timewait[TW]
    assert lc.phase() == (TIME_WAIT, 2.5199)
    assert states(lc)[-2:] == [("FIN_WAIT2", 2.02, 2.5199, "peer"), ("TIME_WAIT", 2.5199, None, "peer")]
    engine.feed(tw(62.6, TIMER_CANCEL, TIME_WAIT, -20))
    engine.feed(tw(62.6, TIMER_EXPIRE, TIME_WAIT, -20))
    (final,) = engine.advance(63)
    fw2, tw_iv = final.intervals()[-2:]
    assert fw2.source == "exact" and fw2.leave == pytest.approx(62.6 - 0.08 - 60)
    assert tw_iv.source == "exact" and tw_iv.leave == 62.6


class Snap:
    """A sock_diag entry (tcptrace_bpf.sockdiag.DiagSocket has these fields)."""

    def __init__(self, state, laddr="10.0.0.1", lport=40000, raddr="10.0.0.2", rport=80, timer=0, probes=0,
                 expires_ms=0, inode=1, family=4):
        self.state, self.laddr, self.lport, self.raddr, self.rport = state, laddr, lport, raddr, rport
        self.timer, self.probes, self.expires_ms, self.inode, self.family = timer, probes, expires_ms, inode, family

    @property
    def timewait(self):
        return self.timer == 3


def test_preexisting_socket_is_adopted_then_traced_to_its_end():
    from .streams import CLOSE_WAIT, LAST_ACK

    engine = Engine(timers=True, hz=HZ)
    assert engine.adopt([(Snap(ESTABLISHED), (42, "redis"))], now=0.5) == 1
    (lc,) = engine.open.values()
    assert lc.start is None and (lc.pid, lc.comm, lc.pid_source) == (42, "redis", "inode")
    assert states(lc) == [("ESTABLISHED", None, None, "partial")]
    engine.feed(st(3.0, CLIENT_SK, ESTABLISHED, CLOSE_WAIT))
    assert engine.open[CLIENT_SK] is lc  # the live event took it over by 4-tuple
    engine.feed(st(3.5, CLIENT_SK, CLOSE_WAIT, LAST_ACK, pid=42, comm="redis"))
    engine.feed(st(3.6, CLIENT_SK, LAST_ACK, CLOSE))
    (final,) = engine.advance(5)
    assert states(final) == [("ESTABLISHED", None, 3.0, "partial"), ("CLOSE_WAIT", 3.0, 3.5, "exact"),
                             ("LAST_ACK", 3.5, 3.6, "exact")]
    assert final.close_kind() == "passive" and final.gaps == 0


def test_preexisting_time_wait_knows_its_start_and_end():
    engine = Engine(timers=True, hz=HZ)
    engine.adopt([(Snap(TIME_WAIT, timer=3, expires_ms=20000, inode=0), None)], now=1.0)
    (lc,) = engine.timewait.values()
    assert lc.phase() == (TIME_WAIT, pytest.approx(1.0 + 20 - 60))
    engine.feed(tw(21.3, TIMER_CANCEL, TIME_WAIT, -75))
    engine.feed(tw(21.3, TIMER_EXPIRE, TIME_WAIT, -75))
    (final,) = engine.advance(22)
    (only,) = final.intervals()
    assert (state_name(only.state), only.source, only.leave) == ("TIME_WAIT", "polled", 21.3)
    assert only.duration == pytest.approx(60.3) and final.tw_end_how == "expired"


def test_preexisting_listener_owns_new_children():
    from .streams import LISTEN, SERVER_SK, SYN_RECV

    engine = Engine()
    engine.adopt([(Snap(LISTEN, laddr="0.0.0.0", lport=80, raddr="0.0.0.0", rport=0), (9, "nginx"))], now=0)
    child = engine.feed(st(1, SERVER_SK, LISTEN, SYN_RECV, laddr="10.0.0.2", lport=80, rport=5555))
    assert child.role == "server" and (child.pid, child.pid_source) == (9, "listener")


def test_same_pointer_same_tuple_after_reuse_is_a_new_timewait_socket():
    """Seen on 6.18: a reconnect on the same 4-tuple kills the old timewait socket (cancel), and when the new
    connection closes its timewait socket gets the same memory: a start on a held pointer, same tuple."""
    sk2 = CLIENT_SK + 0x100
    events = orphan_close() + [tw(2.5, TIMER_CANCEL, FW2, 14000), tw(2.5, TIMER_START, TIME_WAIT, 60 * HZ)]
    events += [st(5.0, sk2, CLOSE, SYN_SENT, pid=100, comm="curl", lport=0),
               tw(5.00001, TIMER_CANCEL, TIME_WAIT, int(57.5 * HZ)),
               st(5.0001, sk2, SYN_SENT, ESTABLISHED), st(5.001, sk2, ESTABLISHED, FIN_WAIT1, pid=100, comm="curl"),
               st(5.002, sk2, FIN_WAIT1, FIN_WAIT2), tw(5.00201, TIMER_START, FW2, 60 * HZ),
               st(5.00202, sk2, FIN_WAIT2, CLOSE)]
    engine, closed, final = run(events, until=6)
    old = next(lc for lc in final if lc.sock == CLIENT_SK)
    assert old.tw_end_how == "reused" and old.tw_end == pytest.approx(5.00001)
    assert old.intervals()[-1].state == TIME_WAIT and old.intervals()[-1].enter == 2.5
    assert engine.timewait[TW].sock == sk2 and engine.timewait[TW].tw_state == FW2


def test_held_timewait_lifecycles_are_bounded():
    engine = Engine(timers=True, hz=HZ, max_timewait=2)
    for i in range(4):
        sk, ptr = CLIENT_SK + i * 0x100, TW + i * 0x100
        for ev in orphan_close(t0=1.0 + i):
            if ev.kind == TIMEWAIT:
                ev = ev._replace(sock=ptr, lport=40000 + i)
            else:
                ev = ev._replace(sock=sk, lport=40000 + i if ev.lport else 0)
            engine.feed(ev)
    final = engine.advance(10)
    assert len(engine.timewait) == 2 and engine.evicted == 2
    assert [lc.tw_end_how for lc in final] == ["untracked", "untracked"]
    assert final[0].intervals()[-1].leave is None


def test_trace_prints_the_close_then_the_timewait_end():
    import io

    from tcptrace_bpf.text import TextSink

    events = orphan_close() + [tw(2.52, TIMER_CANCEL, TIME_WAIT, 60 * HZ - 125),
                               tw(2.52, TIMER_START, TIME_WAIT, 60 * HZ),
                               tw(62.53, TIMER_CANCEL, TIME_WAIT, -2), tw(62.53, TIMER_EXPIRE, TIME_WAIT, -2)]
    out = io.StringIO()
    sink = TextSink(out)
    engine = Engine(timers=True, hz=HZ)
    for ev in events:
        engine.feed(ev)
        for lc in engine.advance(ev.ts):
            sink.finished(lc)
        for lc in engine.closed():
            sink.closed(lc)
    first, second = out.getvalue().splitlines()
    assert first.endswith("FIN_WAIT1 20.0ms > FIN_WAIT2 open") and first.lstrip().startswith("2.020")
    assert second.split() == ["62.530", "client", "10.0.0.1:40000", "->", "10.0.0.2:80", "timewait", "expired", "|",
                              "FIN_WAIT2", "500.0ms", ">", "TIME_WAIT", "60.01s"]


def test_snapshot_adoption_is_bounded_too():
    engine = Engine(timers=True, hz=HZ, max_timewait=3)
    snaps = [(Snap(TIME_WAIT, lport=41000 + i, timer=3, expires_ms=30000, inode=0), None) for i in range(5)]
    assert engine.adopt(snaps, now=1.0) == 5
    assert len(engine.timewait) == 3 and engine.evicted == 2


def test_no_waiting_entry_left_when_the_address_is_reused_at_once():
    """A close whose timewait start was lost, then the address reborn within the grace period: nothing leaks."""
    events = orphan_close()[:4] + [st(2.02002, CLIENT_SK, FIN_WAIT2, CLOSE),
                                   st(2.03, CLIENT_SK, CLOSE, SYN_SENT, pid=1, comm="a", lport=0)]
    engine, _closed, _final = run(events, until=2.04)
    assert engine._tw_waiting == {}
