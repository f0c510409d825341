"""Builders for synthetic event streams, written the way the kernel emits them (checked on 6.18)."""

from __future__ import annotations

from tcptrace_bpf.engine import Engine, Lifecycle
from tcptrace_bpf.events import (
    CLOSE,
    CLOSE_WAIT,
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
    Event,
)

CLIENT_SK = 0xFFFF000000001000
SERVER_SK = 0xFFFF000000002000
LISTEN_SK = 0xFFFF000000003000


def st(ts, sock, old, new, laddr="10.0.0.1", lport=40000, raddr="10.0.0.2", rport=80, pid=0, comm="swapper/0",
       err=0):
    return Event(ts, STATE, sock, old, new, 4, laddr, lport, raddr, rport, pid, comm, err)


def other(kind, ts, sock, pid=0, comm="swapper/0", old=0, err=0, laddr="10.0.0.1", lport=40000,
          raddr="10.0.0.2", rport=80):
    return Event(ts, kind, sock, old, 0, 4, laddr, lport, raddr, rport, pid, comm, err)


def client_active_close(t0=1.0):
    """connect at t0, established +0.01, close() +1.0, peer ACKs +0.02, orphan handed to timewait +0.00001."""
    sk = CLIENT_SK
    return [
        st(t0, sk, CLOSE, SYN_SENT, lport=0, pid=100, comm="curl"),
        st(t0 + 0.01, sk, SYN_SENT, ESTABLISHED),
        st(t0 + 1.01, sk, ESTABLISHED, FIN_WAIT1, pid=100, comm="curl"),
        st(t0 + 1.03, sk, FIN_WAIT1, FIN_WAIT2),
        st(t0 + 1.03001, sk, FIN_WAIT2, CLOSE),
    ]


def server_passive_close(t0=1.0, hold=0.5, listener=True):
    """listener (pid 200) accepts; peer closes at t0+1.0; the app holds CLOSE_WAIT `hold` seconds."""
    kw = dict(laddr="10.0.0.2", lport=80, raddr="10.0.0.1", rport=40000)
    listen = [st(t0 - 1, LISTEN_SK, CLOSE, LISTEN, laddr="0.0.0.0", lport=80, raddr="0.0.0.0", rport=0, pid=200,
                 comm="nginx")]
    return (listen if listener else []) + [
        # pre-6.15 kernels: the child's first event has the listener's tuple and remote 0
        st(t0 + 0.01, SERVER_SK, LISTEN, SYN_RECV, laddr="0.0.0.0", lport=80, raddr="", rport=0, pid=100,
           comm="curl"),
        st(t0 + 0.01001, SERVER_SK, SYN_RECV, ESTABLISHED, pid=100, comm="curl", **kw),
        st(t0 + 1.01, SERVER_SK, ESTABLISHED, CLOSE_WAIT, **kw),
        st(t0 + 1.01 + hold, SERVER_SK, CLOSE_WAIT, LAST_ACK, pid=201, comm="nginx-worker", **kw),
        st(t0 + 1.02 + hold, SERVER_SK, LAST_ACK, CLOSE, **kw),
    ]


def run(events, end=None, grace=0.25) -> tuple[Engine, list[Lifecycle]]:
    """Feed everything, advance past the grace period, finish; returns (engine, finished lifecycles)."""
    engine = Engine(grace=grace)
    done = []
    for ev in events:
        engine.feed(ev)
        done.extend(engine.advance(ev.ts))
    if end is not None:
        done.extend(engine.advance(end))
    done.extend(engine.finish())
    return engine, done


__all__ = [
    "CLOSE", "CLOSE_WAIT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "LAST_ACK", "LISTEN", "OWNER",
    "RESET_RECV", "RESET_SENT", "RETRANSMIT", "SYN_RECV", "SYN_SENT",
]
