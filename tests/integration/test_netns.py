"""Across network namespaces joined by veth: retransmissions provoked with nftables, SYN timeout."""

from __future__ import annotations

import errno
import socket
import time

import pytest

from tcptrace_bpf.events import CLOSE_WAIT, ESTABLISHED, RETRANSMIT, SYN_SENT

from .net import Peer

TOL = 0.15


def test_active_close_across_namespaces(live, netns):
    server_ip = netns.V4[1]
    port = 8081
    peer = Peer(server_ip, port, hold=0.3, netns=netns.server)
    c = netns.socket()
    c.settimeout(5)
    c.connect((server_ip, port))
    c.sendall(b"x")
    time.sleep(0.2)
    lport = c.getsockname()[1]
    c.close()
    peer.wait()
    (client,) = live.wait_for(lambda lc: lc.lport == lport and lc.rport == port, closed=True)
    assert (client.laddr, client.raddr) == (netns.V4[0], server_ip)
    assert client.close_kind() == "active"
    established = [iv for iv in client.intervals() if iv.state == ESTABLISHED][0]
    assert established.duration == pytest.approx(0.2, abs=TOL)
    (server,) = live.wait_for(lambda lc: lc.lport == port and lc.rport == lport)
    assert server.pid == peer.pid
    cw = [iv for iv in server.intervals() if iv.state == CLOSE_WAIT][0]
    assert cw.duration == pytest.approx(0.3, abs=TOL)


def test_retransmissions_counted_while_the_peer_drops(live, netns):
    server_ip = netns.V4[1]
    port = 8082
    peer = Peer(server_ip, port, hold=0, netns=netns.server)
    c = netns.socket()
    c.settimeout(10)
    c.connect((server_ip, port))
    lport = c.getsockname()[1]
    with netns.drop(f"tcp dport {port}"):
        c.sendall(b"lost in the void")
        time.sleep(1.2)  # RTO 200 ms min, doubling: 3 or more retransmissions
    c.close()
    peer.wait()
    (client,) = live.wait_for(lambda lc: lc.lport == lport and lc.rport == port, timeout=15, closed=True)
    assert client.retransmits >= 2
    assert client.close_kind() == "active"
    retrans = live.events_for(lambda ev: ev.kind == RETRANSMIT and ev.sock == client.sock and ev.lport == lport)
    assert len(retrans) == client.retransmits
    assert all(ev.old == ESTABLISHED for ev in retrans[:2])


def test_syn_timeout_is_timeout(live, netns):
    server_ip = netns.V4[1]
    port = 8083
    c = netns.socket()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)  # one retry: gives up after ~3 s
    with netns.drop(f"tcp dport {port}"):
        with pytest.raises((TimeoutError, OSError)) as caught:
            c.connect((server_ip, port))
        assert caught.value.errno == errno.ETIMEDOUT
    c.close()
    (client,) = live.wait_for(lambda lc: lc.rport == port and lc.raddr == server_ip, timeout=15)
    assert client.close_kind() == "timeout" and client.error == errno.ETIMEDOUT
    assert [iv.state for iv in client.intervals()] == [SYN_SENT]
    assert 2.0 < client.intervals()[0].duration < 10.0  # 1 s initial RTO, doubling, one retry allowed
    syn_retrans = live.events_for(lambda ev: ev.kind == RETRANSMIT and ev.sock == client.sock)
    assert client.retransmits >= 1 and len(syn_retrans) == client.retransmits
    assert all(ev.old == SYN_SENT for ev in syn_retrans)


def test_ipv6_across_namespaces(live, netns):
    server_ip = netns.V6[1]
    port = 8084
    peer = Peer(server_ip, port, hold=0.1, family=6, netns=netns.server)
    c = netns.socket(socket.AF_INET6)
    c.settimeout(5)
    c.connect((server_ip, port))
    lport = c.getsockname()[1]
    c.close()
    peer.wait()
    (client,) = live.wait_for(lambda lc: lc.lport == lport and lc.rport == port, closed=True)
    assert client.family == 6 and client.raddr == server_ip and client.close_kind() == "active"
