"""A peer process for integration tests, so server sockets have an owner other than the test process.

Loopback runs the receiver's softirq inside the *sender's* system call, so the task seen at a packet-driven
transition is the other process: a separate peer is what makes owner attribution testable.

usage: peer.py serve HOST PORT HOLD [FAMILY]
  listen, print "ready <pid>", accept one connection, read to EOF (or RST), sleep HOLD seconds (CLOSE_WAIT),
  close.
"""

from __future__ import annotations

import os
import socket
import sys
import time


def serve(host: str, port: int, hold: float, family: int) -> None:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(8)
    print(f"ready {os.getpid()}", flush=True)
    conn, _addr = listener.accept()
    conn.settimeout(60)  # long enough for a tracer to start in an emulated VM
    try:
        while conn.recv(4096):
            pass
    except ConnectionResetError:
        print("reset", flush=True)
    time.sleep(hold)
    conn.close()
    listener.close()
    print("done", flush=True)


if __name__ == "__main__":
    if sys.argv[1] != "serve":
        raise SystemExit(__doc__)
    serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]),
          socket.AF_INET6 if len(sys.argv) > 5 and sys.argv[5] == "6" else socket.AF_INET)
