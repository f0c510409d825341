"""End to end: `tcptrace-bpf record` as a real process, stopped by SIGINT, then `report` on its file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from tcptrace_bpf.cli import cli

from .net import Peer, free_port

TOOL = [sys.executable, "-m", "tcptrace_bpf"]


def start_recorder(path: Path, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([*TOOL, "record", "--output", str(path), *args], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the header is written once every probe is attached
        if path.exists() and path.read_text().startswith('{"type": "header"'):
            return proc
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("no header within 30 s")


def test_record_then_report(tmp_path):
    path = tmp_path / "trace.jsonl"
    port = free_port()
    proc = start_recorder(path, "--port", str(port))
    peer = Peer("127.0.0.1", port, hold=0.3)
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    lport = c.getsockname()[1]
    c.sendall(b"x")
    c.close()
    peer.wait()
    other = free_port()  # a connection the --port filter must keep out
    Peer("127.0.0.1", other, hold=0)
    socket.create_connection(("127.0.0.1", other), timeout=5).close()
    time.sleep(0.6)  # past the engine's grace period, and one flush
    # flushed at least once a second: the transitions are on disk before the recorder stops
    assert '"type": "transition"' in path.read_text()
    stopped = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0, proc.stderr.read()
    assert time.monotonic() - stopped < 2.0

    records = [json.loads(line) for line in path.read_text().splitlines()]
    header, footer = records[0], records[-1]
    assert header["schema"] == 1 and header["filters"] == {"port": port}
    assert header["hooks"]["state"] == "raw tracepoint sock:inet_sock_set_state"  # this kernel has BTF
    assert footer["type"] == "footer" and footer["reason"] == "SIGINT" and footer["lost_events"] == 0
    conns = {(r["role"], r["lport"]): r for r in records if r["type"] == "connection"}
    client = conns[("client", lport)]
    assert client["close"] == "active" and client["pid"] == os.getpid()
    assert [s["state"] for s in client["states"]][-1] == "TIME_WAIT"
    server = conns[("server", port)]
    assert server["close"] == "passive" and server["pid"] == peer.pid and server["pid_source"]
    assert all(port in (r["lport"], r["rport"]) for r in records if r["type"] == "connection")
    # the kernel may give the socket's address to the next connection at once: this lifetime's transitions only
    transitions = [r for r in records if r["type"] == "transition" and r["sock"] == client["sock"]
                   and client["start"] <= r["ts"] <= client["end"]]
    assert [t["to"] for t in transitions] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]

    result = CliRunner().invoke(cli, ["report", str(path)])
    assert result.exit_code == 0, result.output
    assert "CLOSE_WAIT" in result.output and "Close kinds:" in result.output
    data = json.loads(CliRunner().invoke(cli, ["report", str(path), "--json"]).output)
    cw = next(row for row in data["states"] if row["state"] == "CLOSE_WAIT")
    assert abs(cw["p50"] - 0.3) < 0.15


def test_record_duration_stops_by_itself(tmp_path):
    path = tmp_path / "short.jsonl"
    started = time.monotonic()
    result = subprocess.run([*TOOL, "record", "-o", str(path), "--duration", "1"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = path.read_text().splitlines()
    assert json.loads(lines[-1])["reason"] == "duration"
    assert time.monotonic() - started < 30


def test_record_refuses_without_root():
    """Not root: one clear line naming the fix, non-zero exit, no traceback."""
    nobody = 65534
    result = subprocess.run([*TOOL, "record", "-o", "-"], capture_output=True, text=True,
                            timeout=60, preexec_fn=lambda: os.setuid(nobody), cwd="/")
    assert result.returncode == 1
    assert "cannot trace: not running as root" in result.stderr and "Traceback" not in result.stderr
