"""Each diagnosis from synthetic lifecycles and events, and silence below its threshold."""

from __future__ import annotations

import errno

from tcptrace_bpf.diagnose import (
    CLOSE_WAIT_PILE,
    FIN_WAIT2_HELD,
    RETRANS_HOT,
    SYN_SENT_PEERS,
    Diagnoser,
    HostLimits,
)
from tcptrace_bpf.engine import Engine
from tcptrace_bpf.events import RETRANSMIT

from .streams import (
    CLOSE,
    CLOSE_WAIT,
    ESTABLISHED,
    FIN_WAIT1,
    FIN_WAIT2,
    SYN_SENT,
    client_active_close,
    other,
    st,
)


def feed(events, diag, engine=None):
    engine = engine or Engine()
    for ev in events:
        diag.event(ev, engine.feed(ev))
        for lc in engine.advance(ev.ts):
            diag.finished(lc)
    return engine


def titles(diags):
    return [d.title for d in diags]


def test_close_wait_pile_names_the_process_and_oldest():
    diag = Diagnoser()
    events = []
    for i in range(CLOSE_WAIT_PILE):
        sk = 0x5000 + i
        events += [st(0, sk, CLOSE, SYN_SENT, pid=300, comm="app"), st(0.1, sk, SYN_SENT, ESTABLISHED),
                   st(1 + i, sk, ESTABLISHED, CLOSE_WAIT)]
    engine = feed(events, diag)
    (d,) = diag.diagnose(engine.open.values(), now=20)
    assert d.severity == "critical"
    assert d.title == "CLOSE_WAIT piling up in app[300]: the application does not call close()"
    assert d.evidence == f"{CLOSE_WAIT_PILE} sockets in CLOSE_WAIT, oldest 19.0s"


def test_close_wait_below_threshold_is_silent():
    diag = Diagnoser()
    events = [st(0, 0x5000, CLOSE, SYN_SENT, pid=300, comm="app"), st(0.1, 0x5000, SYN_SENT, ESTABLISHED),
              st(1, 0x5000, ESTABLISHED, CLOSE_WAIT)]
    engine = feed(events, diag)
    assert diag.diagnose(engine.open.values(), now=5) == []
    assert len(diag.diagnose(engine.open.values(), now=12)) == 1  # one socket held over 10 s


def test_fin_wait2_held():
    diag = Diagnoser()
    sk = 0x6000
    engine = feed([st(0, sk, CLOSE, SYN_SENT, pid=1, comm="cli"), st(0.1, sk, SYN_SENT, ESTABLISHED),
                   st(1, sk, ESTABLISHED, FIN_WAIT1, pid=1, comm="cli"), st(1.1, sk, FIN_WAIT1, FIN_WAIT2)], diag)
    assert diag.diagnose(engine.open.values(), now=1.1 + FIN_WAIT2_HELD - 1) == []
    (d,) = diag.diagnose(engine.open.values(), now=1.1 + FIN_WAIT2_HELD + 2)
    assert d.title.startswith("FIN_WAIT2 held") and "cli[1]" in d.evidence and "7.0s" in d.evidence


def test_time_wait_against_port_range():
    diag = Diagnoser(HostLimits(port_range=10, max_tw_buckets=1000))
    events = []
    for i in range(5):
        events += [ev._replace(sock=0x7000 + i, ts=ev.ts + i) for ev in client_active_close(t0=1.0)]
    engine = feed(events, diag)
    for lc in engine.advance(10):
        diag.finished(lc)
    diags = diag.diagnose([], now=10)
    assert titles(diags) == ["TIME_WAIT to 10.0.0.2:80: local ports running out"]
    assert "5 entered in the last minute (each lasts 60s) against 10 local ports (50%)" in diags[0].evidence
    assert diag.diagnose([], now=80) == []  # a minute later the window is empty


def test_time_wait_against_max_buckets():
    diag = Diagnoser(HostLimits(port_range=100000, max_tw_buckets=4))
    events = []
    for i in range(2):
        events += [ev._replace(sock=0x7000 + i, ts=ev.ts + i) for ev in client_active_close(t0=1.0)]
    engine = feed(events, diag)
    for lc in engine.advance(10):
        diag.finished(lc)
    assert titles(diag.diagnose([], now=10)) == ["TIME_WAIT near tcp_max_tw_buckets"]


def test_syn_sent_to_many_peers():
    diag = Diagnoser()
    events = [st(i * 0.1, 0x8000 + i, CLOSE, SYN_SENT, raddr=f"10.9.0.{i}", rport=22, pid=66, comm="scanner")
              for i in range(SYN_SENT_PEERS)]
    engine = feed(events, diag)
    (d,) = diag.diagnose(engine.open.values(), now=2)
    assert d.title.startswith("scanner[66] connects to many peers")
    assert d.evidence.startswith(f"{SYN_SENT_PEERS} distinct peers in the last minute, e.g. 10.9.0.0:22")
    diag2 = Diagnoser()
    feed(events[:-1], diag2)
    assert diag2.diagnose([], now=2) == []


def test_retransmission_hot_spot():
    diag = Diagnoser()
    events = [st(0, 0x9000, CLOSE, SYN_SENT, pid=1, comm="c"), st(0.1, 0x9000, SYN_SENT, ESTABLISHED)]
    events += [other(RETRANSMIT, 1 + i * 0.1, 0x9000, old=ESTABLISHED) for i in range(RETRANS_HOT)]
    engine = feed(events, diag)
    (d,) = diag.diagnose(engine.open.values(), now=3)
    assert d.title == "retransmissions to 10.0.0.2:80" and d.evidence.startswith(f"{RETRANS_HOT} retransmitted")


def test_killed_by_timeout():
    diag = Diagnoser()
    sk = 0xA000
    engine = feed([st(0, sk, CLOSE, SYN_SENT, pid=1, comm="c"), st(0.1, sk, SYN_SENT, ESTABLISHED),
                   st(5, sk, ESTABLISHED, CLOSE, err=errno.ETIMEDOUT)], diag)
    for lc in engine.advance(6):
        diag.finished(lc)
    (d,) = diag.diagnose([], now=6)
    assert d.title.startswith("connections killed by timeout") and "10.0.0.2:80 (1)" in d.evidence


def test_timer_events_are_not_connection_attempts():
    """A timewait timer cancel has sub-kind 2, the number of SYN_SENT: it must not count as a connect."""
    from tcptrace_bpf.events import TIMER_CANCEL, TIMEWAIT

    diag = Diagnoser()
    for i in range(SYN_SENT_PEERS * 2):
        diag.event(other(TIMEWAIT, 1 + i * 0.01, 0x9000 + i, old=6, rport=30000 + i)._replace(new=TIMER_CANCEL),
                   Engine().feed(st(1, 0x100 + i, ESTABLISHED, CLOSE_WAIT)))
    assert diag.diagnose([], now=2) == []
