"""Test networks: free ports, peers, and two network namespaces joined by a veth pair.

Traffic goes only to loopback and to addresses inside the namespaces these helpers create (and remove).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

CLONE_NEWNET = 0x40000000
PEER = Path(__file__).with_name("peer.py")
_libc = ctypes.CDLL(None, use_errno=True)


def free_port(host: str = "127.0.0.1", family: int = socket.AF_INET) -> int:
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def close_many(count: int, pause: float = 0.0) -> tuple[int, list[int]]:
    """`count` loopback connections to a listener on a free port, one after another, each closed by the
    client first (its end goes to TIME_WAIT) and then by the server once it reads EOF: 10 state changes each,
    plus the listener's own two.  Returns the listener's port and the clients' local ports."""
    port = free_port()
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", port))
    server.listen(64)
    lports = []
    for _ in range(count):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        lports.append(c.getsockname()[1])
        a, _ = server.accept()
        c.close()
        a.recv(1)
        a.close()
        if pause:
            time.sleep(pause)
    server.close()
    return port, lports


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


class Peer:
    """peer.py serving one connection in its own process (optionally inside a namespace)."""

    def __init__(self, host: str, port: int, hold: float, family: int = 4, netns: Optional[str] = None) -> None:
        cmd = [sys.executable, str(PEER), "serve", host, str(port), str(hold), str(family)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().split()
        assert line and line[0] == "ready", f"peer did not start: {line}"
        self.pid = int(line[1])

    def wait(self, timeout: float = 15) -> None:
        assert self.proc.wait(timeout) == 0


class NetnsPair:
    """Namespaces <name>-c (client) and <name>-s (server) joined by veth, IPv4 and IPv6 addressed."""

    V4 = ("198.18.231.1", "198.18.231.2")
    V6 = ("fd00:7c7:231::1", "fd00:7c7:231::2")

    def __init__(self, name: str) -> None:
        self.client, self.server = f"{name}-c", f"{name}-s"

    def create(self) -> None:
        self.destroy()
        run("ip", "netns", "add", self.client)
        run("ip", "netns", "add", self.server)
        run("ip", "link", "add", "ttveth-c", "netns", self.client, "type", "veth", "peer", "name", "ttveth-s",
            "netns", self.server)
        for ns, dev, v4, v6 in ((self.client, "ttveth-c", self.V4[0], self.V6[0]),
                                (self.server, "ttveth-s", self.V4[1], self.V6[1])):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
            run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")

    def destroy(self) -> None:
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A TCP socket created inside the client namespace (setns in a helper thread, which then ends)."""
        result: list[socket.socket] = []

        def work() -> None:
            fd = os.open(f"/run/netns/{self.client}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns failed")
                result.append(socket.socket(family, socket.SOCK_STREAM))
            finally:
                os.close(fd)

        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
        assert result, "could not create a socket in the client namespace"
        return result[0]

    @contextlib.contextmanager
    def drop(self, rule: str) -> Iterator[None]:
        """An nftables rule dropping matching packets on the server's input, removed on exit."""
        nft = ["ip", "netns", "exec", self.server, "nft"]
        run(*nft, "add table inet tcptrace_test")
        run(*nft, "add chain inet tcptrace_test input { type filter hook input priority 0 ; }")
        run(*nft, f"add rule inet tcptrace_test input {rule} drop")
        try:
            yield
        finally:
            run(*nft, "delete table inet tcptrace_test")
