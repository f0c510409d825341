"""The live view end to end: running in tmux against real sockets, the screen read back with capture-pane."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from .net import Peer, free_port

SESSION = "tcptrace-live-test"
ERRORS = "/tmp/tcptrace-live-test.err"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-p", "-t", SESSION)


def wait_screen(predicate, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = screen()
        if predicate(text):
            return text
        time.sleep(0.2)
    errors = open(ERRORS).read() if os.path.exists(ERRORS) else ""
    raise AssertionError(f"screen never matched; last screen:\n{text}\nstderr:\n{errors[-2000:]}")


def quit_cleanly(reason: str) -> None:
    """The program ended with status 0: its last line, or (once tmux has replaced the screen) the dead pane."""
    wait_screen(lambda s: f"stopped ({reason})" in s or "Pane is dead (status 0," in s, timeout=10)


@pytest.fixture
def live_in_tmux():
    assert shutil.which("tmux"), "tmux is missing (setup.sh installs it)"
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)

    def start(*args: str) -> None:
        # pytest exports COLUMNS=80/LINES=24, which rich would obey over the real 200x50 pane
        cmd = " ".join(["env", "-u", "COLUMNS", "-u", "LINES", sys.executable, "-m", "tcptrace_bpf", "live", *args,
                        "2>", ERRORS])
        tmux("new-session", "-d", "-s", SESSION, "-x", "200", "-y", "50", cmd)
        tmux("set-option", "-t", SESSION, "remain-on-exit", "on")
        tmux("resize-window", "-t", SESSION, "-x", "200", "-y", "50")

    yield start
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def test_live_view_shows_the_tests_connection(live_in_tmux):
    port = free_port()
    live_in_tmux("--port", str(port))
    wait_screen(lambda s: "tcptrace-bpf live" in s and "open sockets" in s)
    peer = Peer("127.0.0.1", port, hold=0)
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    lport = c.getsockname()[1]
    try:
        text = wait_screen(lambda s: any(line.split()[:1] == [f"127.0.0.1:{lport}"] for line in s.splitlines()))
        (row,) = [line.split() for line in text.splitlines() if line.split()[:1] == [f"127.0.0.1:{lport}"]]
        assert row[1] == f"127.0.0.1:{port}" and row[2].endswith(f"[{os.getpid()}]") and row[3] == "ESTABLISHED"
        assert "lost 0" in text
        # only the filtered port shows up
        assert all(f":{port}" in line for line in text.splitlines() if line.startswith("127.0.0.1:"))
    finally:
        c.close()
        peer.wait()
    text = wait_screen(lambda s: "recent closes" in s and "active" in s and f":{lport} ->" in s)
    assert "lost 0" in text
    tmux("send-keys", "-t", SESSION, "q")
    quit_cleanly("q")


def test_live_keys_sort_and_filter(live_in_tmux):
    port = free_port()
    live_in_tmux("--port", str(port))
    wait_screen(lambda s: "sorted by in-state" in s)
    tmux("send-keys", "-t", SESSION, "s")
    wait_screen(lambda s: "sorted by age" in s)
    tmux("send-keys", "-t", SESSION, "f")
    wait_screen(lambda s: "state LISTEN" in s)
    tmux("send-keys", "-t", SESSION, "p")
    wait_screen(lambda s: "PAUSED" in s)
    tmux("send-keys", "-t", SESSION, "C-c")
    quit_cleanly("SIGINT")
