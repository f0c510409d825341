"""Exact hidden phases on the real kernel: the timewait socket's FIN_WAIT2 and TIME_WAIT, how TIME_WAIT
ends (expiry, RST, reuse), and keepalive probes until keepalive kills the connection."""

from __future__ import annotations

import socket
import time

import pytest

from tcptrace_bpf.events import CLOSE_WAIT, FIN_WAIT2, TIME_WAIT

from .net import Peer, free_port

TOL = 0.15


def interval(lc, state):
    (iv,) = [iv for iv in lc.intervals() if iv.state == state]
    return iv


def by_ports(lport, rport):
    return lambda lc: lc.lport == lport and lc.rport == rport


@pytest.fixture(autouse=True)
def needs_timers(live):
    assert live.plan.timers, f"timer hooks unavailable: {live.plan.hooks['time_wait']}"


def test_orphan_fin_wait2_lasts_until_the_peers_fin(live):
    """close() before the peer's FIN: the kernel's tracepoint shows FIN_WAIT2 for microseconds; the
    timewait socket holds it until the peer closes, 0.5 s later."""
    port = free_port()
    peer = Peer("127.0.0.1", port, hold=0.5)
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    lport = c.getsockname()[1]
    c.sendall(b"x")
    c.close()
    peer.wait()
    (client,) = live.wait_for(by_ports(lport, port), closed=True)
    fw2 = interval(client, FIN_WAIT2)
    assert fw2.source in ("peer", "exact") and fw2.duration == pytest.approx(0.5, abs=TOL)
    deadline = time.monotonic() + 5
    while client.tw_state != TIME_WAIT and time.monotonic() < deadline:
        time.sleep(0.05)
    tw = interval(client, TIME_WAIT)
    assert tw.enter == pytest.approx(fw2.leave) and tw.leave is None and tw.source == fw2.source
    (server,) = live.wait_for(by_ports(port, lport))
    assert interval(server, CLOSE_WAIT).duration == pytest.approx(fw2.duration, abs=0.02)


def test_time_wait_expires_after_60_seconds(live):
    port = free_port()
    peer = Peer("127.0.0.1", port, hold=0)
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    lport = c.getsockname()[1]
    c.close()
    peer.wait()
    (client,) = live.wait_for(by_ports(lport, port), timeout=75)  # final only when the timewait socket is gone
    assert client.tw_end_how == "expired"
    tw = interval(client, TIME_WAIT)
    # armed for exactly 60 s; the timer wheel fires it up to a bucket (2 s at HZ 250) late
    assert 60.0 <= tw.duration < 63.0 and tw.source == "exact"


def test_time_wait_ended_by_a_rst_from_the_timewait_socket(live):
    """The peer sends data to a closed, orphaned end instead of its FIN: the timewait socket (still in
    FIN_WAIT2) answers with a RST and dies."""
    port = free_port()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    a, _ = s.accept()
    lport = c.getsockname()[1]
    c.close()
    time.sleep(0.2)
    a.sendall(b"too late")
    time.sleep(0.2)
    a.close()
    s.close()
    (client,) = live.wait_for(by_ports(lport, port), timeout=10)
    assert client.tw_end_how == "reset"
    assert [iv.state for iv in client.intervals()][-1] == FIN_WAIT2  # it never reached TIME_WAIT
    assert interval(client, FIN_WAIT2).duration == pytest.approx(0.2, abs=TOL)


def test_time_wait_reused_by_a_new_connection(live):
    """Same source port, same destination, after 1 s (tcp_tw_reuse, loopback): the new connection takes
    over the timewait socket."""
    port = free_port()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen()
    lport = free_port()
    for _round in range(2):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        c.bind(("127.0.0.1", lport))
        c.connect(("127.0.0.1", port))
        a, _ = s.accept()
        c.close()  # client closes first: its end goes to TIME_WAIT
        time.sleep(0.1)
        a.close()
        time.sleep(1.3)  # tcp_tw_reuse_delay is 1 s
    s.close()
    first, second = sorted(live.wait_for(by_ports(lport, port), count=1, timeout=10, closed=True)[:1]
                           + live.wait_for(by_ports(lport, port), count=2, closed=True)[1:2], key=lambda lc: lc.start)
    final = live.wait_for(lambda lc: lc is first, timeout=10)
    assert final[0].tw_end_how == "reused"
    assert interval(first, TIME_WAIT).leave == pytest.approx(second.start, abs=0.05)


def test_keepalive_probes_then_timeout(live, netns):
    server_ip = netns.V4[1]
    port = 8085
    peer = Peer(server_ip, port, hold=0, netns=netns.server)
    c = netns.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
    c.settimeout(15)
    c.connect((server_ip, port))
    lport = c.getsockname()[1]
    time.sleep(2.5)  # two answered probes
    with netns.drop(f"tcp dport {port}"):
        with pytest.raises(OSError) as caught:
            c.recv(10)
        assert caught.value.errno == 110  # ETIMEDOUT
    c.close()
    peer.proc.kill()
    (client,) = live.wait_for(by_ports(lport, port), timeout=15)
    assert client.close_kind() == "timeout"
    assert client.keepalive_unanswered == 2
    assert client.keepalive_probes >= 4  # >= 2 answered while the peer was there, then 2 unanswered
