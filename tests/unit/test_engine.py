"""The engine on synthetic streams: one test per lifecycle fact it must get right."""

from __future__ import annotations

import errno

import pytest

from tcptrace_bpf.engine import Engine
from tcptrace_bpf.events import CLOSING, TIME_WAIT, state_name

from .streams import (
    CLIENT_SK,
    CLOSE,
    CLOSE_WAIT,
    ESTABLISHED,
    FIN_WAIT1,
    FIN_WAIT2,
    LAST_ACK,
    LISTEN,
    LISTEN_SK,
    OWNER,
    RESET_RECV,
    RESET_SENT,
    RETRANSMIT,
    SERVER_SK,
    SYN_RECV,
    SYN_SENT,
    client_active_close,
    other,
    run,
    server_passive_close,
    st,
)


def names(lc):
    return [(state_name(iv.state), iv.source) for iv in lc.intervals()]


def only(done, sock):
    found = [lc for lc in done if lc.sock == sock]
    assert len(found) == 1, found
    return found[0]


def test_active_close_enters_time_wait_inferred():
    _engine, done = run(client_active_close(), end=10)
    lc = only(done, CLIENT_SK)
    assert lc.role == "client"
    assert lc.close_kind() == "active"
    assert names(lc) == [("SYN_SENT", "exact"), ("ESTABLISHED", "exact"), ("FIN_WAIT1", "exact"),
                         ("FIN_WAIT2", "inferred"), ("TIME_WAIT", "inferred")]
    ivs = lc.intervals()
    assert ivs[1].duration == pytest.approx(1.0)
    assert ivs[2].duration == pytest.approx(0.02)
    tw = ivs[-1]
    assert tw.enter == pytest.approx(2.03001) and tw.leave is None and tw.duration is None
    assert lc.start == 1.0 and lc.end == pytest.approx(2.03001)


def test_local_port_filled_in_from_later_events():
    _engine, done = run(client_active_close(), end=10)
    lc = only(done, CLIENT_SK)
    assert (lc.laddr, lc.lport, lc.raddr, lc.rport) == ("10.0.0.1", 40000, "10.0.0.2", 80)


def test_client_owner_from_connect_not_from_softirq():
    _engine, done = run(client_active_close(), end=10)
    lc = only(done, CLIENT_SK)
    # SYN_SENT -> ESTABLISHED and FIN_WAIT1 -> FIN_WAIT2 ran as swapper: never the owner
    assert (lc.pid, lc.comm, lc.pid_source) == (100, "curl", "close")


def test_passive_close_with_child_birth_and_listener_owner():
    engine = Engine()
    events = server_passive_close(hold=0.5)
    for ev in events[:3]:
        engine.feed(ev)
    child = engine.open[SERVER_SK]
    # born from LISTEN -> SYN_RECV on a new address: a server socket, owned by the listener's owner,
    # even though the task running at the time was the client (loopback runs softirq in the sender)
    assert child.role == "server"
    assert (child.pid, child.comm, child.pid_source) == (200, "nginx", "listener")
    assert engine.open[LISTEN_SK].state == LISTEN  # the listener did not change
    assert (child.raddr, child.rport) == ("10.0.0.1", 40000)  # filled from SYN_RECV -> ESTABLISHED
    for ev in events[3:]:
        engine.feed(ev)
    done = engine.advance(100)
    lc = only(done, SERVER_SK)
    assert lc.close_kind() == "passive"
    assert names(lc) == [("SYN_RECV", "exact"), ("ESTABLISHED", "exact"), ("CLOSE_WAIT", "exact"),
                         ("LAST_ACK", "exact")]
    assert lc.intervals()[2].duration == pytest.approx(0.5)
    assert (lc.pid, lc.comm, lc.pid_source) == (201, "nginx-worker", "close")
    assert not lc.timewait


def test_simultaneous_close_goes_through_closing_to_time_wait():
    sk = CLIENT_SK
    events = [
        st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
        st(1, sk, ESTABLISHED, FIN_WAIT1, pid=1, comm="a"), st(1.001, sk, FIN_WAIT1, CLOSING),
        st(1.002, sk, CLOSING, CLOSE),
    ]
    _engine, done = run(events, end=10)
    lc = only(done, sk)
    assert lc.close_kind() == "simultaneous"
    assert names(lc)[-2:] == [("CLOSING", "exact"), ("TIME_WAIT", "inferred")]


def test_reset_received_is_reset_and_not_time_wait():
    sk = CLIENT_SK
    events = [
        st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
        other(RESET_RECV, 0.5, sk), st(0.5, sk, ESTABLISHED, CLOSE, err=errno.ECONNRESET),
    ]
    _engine, done = run(events, end=10)
    lc = only(done, sk)
    assert lc.close_kind() == "reset"
    assert lc.resets_received == 1
    assert lc.intervals()[-1].state == ESTABLISHED


def test_reset_in_fin_wait2_cancels_time_wait_inference():
    sk = CLIENT_SK
    events = client_active_close()[:-1] + [other(RESET_RECV, 2.5, sk), st(2.5, sk, FIN_WAIT2, CLOSE, err=32)]
    _engine, done = run(events, end=10)
    lc = only(done, sk)
    assert not lc.timewait
    assert lc.close_kind() == "reset"
    assert TIME_WAIT not in [iv.state for iv in lc.intervals()]
    assert lc.intervals()[-1].source == "exact"


def test_abortive_close_reset_arrives_after_close_within_grace():
    """SO_LINGER 0: the kernel sets CLOSE first, then sends the RST (tcp_send_reset reports state CLOSE)."""
    sk = CLIENT_SK
    engine = Engine(grace=0.25)
    for ev in [st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
               st(1.0, sk, ESTABLISHED, CLOSE, pid=1, comm="a")]:
        engine.feed(ev)
    assert engine.advance(1.1) == []  # not final yet: facts may still come
    engine.feed(other(RESET_SENT, 1.00001, sk, old=CLOSE))
    done = engine.advance(1.3)
    lc = only(done, sk)
    assert lc.close_kind() == "reset" and lc.resets_sent == 1


def test_refused_connect():
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=7, comm="nc"), other(RESET_SENT, 0.001, 0),
              other(RESET_RECV, 0.001, sk), st(0.001, sk, SYN_SENT, CLOSE, err=errno.ECONNREFUSED)]
    _engine, done = run(events, end=10)
    lc = only(done, sk)
    assert lc.close_kind() == "refused"
    assert names(lc) == [("SYN_SENT", "exact")]
    assert lc.resets_received == 1 and lc.resets_sent == 0


def test_timeout_from_sk_err():
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=7, comm="nc"), other(RETRANSMIT, 1, sk, old=SYN_SENT),
              other(RETRANSMIT, 3, sk, old=SYN_SENT), st(7, sk, SYN_SENT, CLOSE, err=errno.ETIMEDOUT)]
    _engine, done = run(events, end=10)
    lc = only(done, sk)
    assert lc.close_kind() == "timeout" and lc.retransmits == 2


def test_keepalive_timeout_is_timeout_not_reset():
    """Keepalive death sends an active RST and closes with ETIMEDOUT: the error decides."""
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=7, comm="nc"), st(0.1, sk, SYN_SENT, ESTABLISHED),
              other(RESET_SENT, 5, sk, old=ESTABLISHED), st(5, sk, ESTABLISHED, CLOSE, err=errno.ETIMEDOUT)]
    _engine, done = run(events, end=10)
    assert only(done, sk).close_kind() == "timeout"


def test_connect_abandoned_by_the_application():
    sk = CLIENT_SK
    _engine, done = run([st(0, sk, CLOSE, SYN_SENT, pid=7, comm="nc"), st(0.5, sk, SYN_SENT, CLOSE, pid=7)], end=9)
    assert only(done, sk).close_kind() == "active"


def test_self_connect_is_one_socket():
    sk = CLIENT_SK
    kw = dict(laddr="127.0.0.1", lport=50000, raddr="127.0.0.1", rport=50000)
    events = [st(0, sk, CLOSE, SYN_SENT, pid=9, comm="self", **kw), st(0.001, sk, SYN_SENT, SYN_RECV, **kw),
              st(0.002, sk, SYN_RECV, ESTABLISHED, **kw)]
    engine, done = run(events)
    lc = only(done, sk)
    assert lc.role == "client"
    assert [iv.state for iv in lc.intervals()] == [SYN_SENT, SYN_RECV, ESTABLISHED]
    assert lc.close_kind() == "open" and lc.end is None
    assert engine.gaps == 0


def test_address_reuse_starts_a_new_lifecycle():
    first = client_active_close(t0=1.0)
    second = client_active_close(t0=5.0)
    _engine, done = run(first + second, end=20)
    lcs = [lc for lc in done if lc.sock == CLIENT_SK]
    assert [lc.start for lc in lcs] == [1.0, 5.0]
    assert all(lc.close_kind() == "active" and lc.gaps == 0 for lc in lcs)


def test_address_reuse_within_grace_finalises_the_previous_lifecycle():
    first = client_active_close(t0=1.0)
    second = client_active_close(t0=first[-1].ts + 0.001)
    engine = Engine(grace=0.25)
    out = []
    for ev in first + second[:1]:
        engine.feed(ev)
        out.extend(engine.advance(ev.ts))
    assert len(out) == 1 and out[0].close_kind() == "active"
    assert engine.open[CLIENT_SK].start == second[0].ts


def test_rebirth_without_close_marks_lost_end():
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
              st(9, sk, CLOSE, SYN_SENT, pid=2, comm="b")]
    engine, done = run(events)
    old, new = [lc for lc in done if lc.sock == sk]
    assert old.close_kind() == "unknown" and old.lost_end and old.end is None
    assert old.intervals()[-1].source == "gap"
    assert new.close_kind() == "open" and new.pid == 2
    assert engine.gaps == 1


def test_missing_transition_is_a_gap_not_a_wrong_duration():
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
              st(2.0, sk, FIN_WAIT1, FIN_WAIT2)]  # ESTABLISHED -> FIN_WAIT1 was lost
    engine, done = run(events)
    lc = only(done, sk)
    ivs = lc.intervals()
    assert [(state_name(i.state), i.source, i.duration) for i in ivs[1:]] == [
        ("ESTABLISHED", "gap", None), ("FIN_WAIT1", "gap", None), ("FIN_WAIT2", "exact", None)]
    assert lc.gaps == 1 and engine.gaps == 1


def test_socket_first_seen_mid_life():
    sk = SERVER_SK
    events = [st(3.0, sk, ESTABLISHED, CLOSE_WAIT), st(3.5, sk, CLOSE_WAIT, LAST_ACK, pid=5, comm="app"),
              st(3.6, sk, LAST_ACK, CLOSE)]
    _engine, done = run(events, end=10)
    lc = only(done, sk)
    assert lc.start is None
    first = lc.intervals()[0]
    assert (first.state, first.enter, first.leave, first.duration, first.source) == (ESTABLISHED, None, 3.0, None,
                                                                                    "partial")
    assert lc.intervals()[1].duration == pytest.approx(0.5)
    assert lc.close_kind() == "passive"


def test_owner_from_io_event_and_hint_before_first_state():
    sk = SERVER_SK
    engine = Engine()
    engine.feed(other(OWNER, 1.0, sk, pid=42, comm="redis"))
    engine.feed(st(1.5, sk, ESTABLISHED, CLOSE_WAIT))
    lc = engine.open[sk]
    assert (lc.pid, lc.comm, lc.pid_source) == (42, "redis", "io")


def test_retransmit_on_unknown_socket_starts_a_midlife_lifecycle():
    engine = Engine()
    lc = engine.feed(other(RETRANSMIT, 1.0, CLIENT_SK, old=ESTABLISHED))
    assert lc is not None and lc.state == ESTABLISHED and lc.retransmits == 1 and lc.start is None


def test_reset_before_midlife_close_is_kept():
    sk = CLIENT_SK
    events = [other(RESET_RECV, 1.0, sk), st(1.0, sk, ESTABLISHED, CLOSE, err=errno.ECONNRESET)]
    _engine, done = run(events, end=9)
    lc = only(done, sk)
    assert lc.resets_received == 1 and lc.close_kind() == "reset"


def test_reset_sent_without_socket_touches_nothing():
    engine = Engine()
    assert engine.feed(other(RESET_SENT, 1.0, 0)) is None
    assert engine.open == {}


def test_lost_events_are_counted():
    engine = Engine()
    engine.note_lost(3)
    engine.note_lost(2)
    assert engine.lost == 5


def test_eviction_is_bounded_and_counted():
    engine = Engine(max_sockets=2)
    for i in range(5):
        engine.feed(st(i, 0x1000 + i, CLOSE, SYN_SENT, pid=1, comm="a"))
    assert len(engine.open) == 2 and engine.evicted == 3


def test_open_at_finish_has_open_last_interval():
    sk = SERVER_SK
    events = server_passive_close()[:4]  # stuck in CLOSE_WAIT
    _engine, done = run(events)
    lc = only(done, sk)
    assert lc.close_kind() == "open"
    last = lc.intervals()[-1]
    assert (last.state, last.leave, last.duration, last.source) == (CLOSE_WAIT, None, None, "exact")


def test_listener_close_is_active():
    events = [st(0, LISTEN_SK, CLOSE, LISTEN, lport=80, pid=3, comm="srv"),
              st(5, LISTEN_SK, LISTEN, CLOSE, lport=80, pid=3, comm="srv")]
    _engine, done = run(events, end=9)
    lc = only(done, LISTEN_SK)
    assert lc.role == "listener" and lc.close_kind() == "active"
    assert lc.intervals()[0].duration == pytest.approx(5)


def test_fin_wait2_full_socket_after_shutdown_then_peer_fin():
    """shutdown(SHUT_WR): FIN_WAIT2 held until the peer's FIN, then TIME_WAIT."""
    sk = CLIENT_SK
    events = [st(0, sk, CLOSE, SYN_SENT, pid=1, comm="a"), st(0.1, sk, SYN_SENT, ESTABLISHED),
              st(1, sk, ESTABLISHED, FIN_WAIT1, pid=1, comm="a"), st(1.01, sk, FIN_WAIT1, FIN_WAIT2),
              st(1.51, sk, FIN_WAIT2, CLOSE)]
    _engine, done = run(events, end=9)
    lc = only(done, sk)
    fw2 = lc.intervals()[3]
    assert fw2.state == FIN_WAIT2 and fw2.duration == pytest.approx(0.5) and fw2.source == "inferred"


@pytest.mark.parametrize("last", [LAST_ACK, SYN_RECV])
def test_other_closes_do_not_infer_time_wait(last):
    sk = SERVER_SK
    events = [st(0, sk, ESTABLISHED, last), st(1, sk, last, CLOSE)]
    _engine, done = run(events, end=9)
    assert not only(done, sk).timewait
