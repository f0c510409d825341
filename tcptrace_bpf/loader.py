"""The loader: a short-lived child process that compiles and attaches the BPF programs with bcc, then hands
the kernel objects to the tracer as file descriptors.

Why a child process: bcc and the LLVM it compiles with cost the process that imports them well over 100 MB
that it keeps for its whole life, while the tracer needs none of it once the programs are attached.
Programs, maps and attachments are kernel objects that live as long as some process holds a descriptor on
them, so the loader passes every one it made over a Unix socket (SCM_RIGHTS) and exits without bcc's
clean-up (which would detach them).  The tracer then reads the ring buffer from its memory (ringbuf.py),
the lost counter with one syscall, and never imports bcc.  Closing the descriptors detaches everything,
also when the tracer dies.

Protocol, on a SOCK_SEQPACKET pair: the tracer sends the pickled Plan; the loader answers with one message,
a pickled dict: {"plan": the plan that loaded (a refused phase mode falls back), "fds": the loader's fd
numbers in the order they are attached, "maps": {"events": fd, "lost": fd}, "progs": {function name: fd}} with the
descriptors attached, or {"error": why} without.  Only our own processes are on either end.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
import traceback
from typing import Any

ANON_KINDS = ("anon_inode:bpf", "anon_inode:[perf_event]", "anon_inode:btf")


def bpf_fds(exclude: int) -> list[int]:
    """This process's descriptors on BPF objects and perf events (programs, maps, links, attachments)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd == exclude:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the directory listing's own descriptor, already closed
            continue
        if target.startswith(ANON_KINDS):
            out.append(fd)
    return sorted(out)


def serve(sock: socket.socket) -> None:
    """Load the plan the tracer sent and answer it (see the module docstring)."""
    plan = pickle.loads(sock.recv(1 << 20))
    try:
        from tcptrace_bpf.kernel import SourceError, load_with_fallbacks

        try:
            bpf, plan = load_with_fallbacks(plan)
        except SourceError as exc:
            sock.send(pickle.dumps({"error": exc.why}))
            return
    except ImportError as exc:  # bcc missing or broken: the one line the user needs
        sock.send(pickle.dumps({"error": f"cannot import bcc ({exc})"}))
        return
    message: dict[str, Any] = {
        "plan": plan, "fds": bpf_fds(sock.fileno()),
        "maps": {"events": bpf[b"events"].map_fd, "lost": bpf[b"lost"].map_fd},
        "progs": {name.decode(): fn.fd for name, fn in bpf.funcs.items()},
    }
    socket.send_fds(sock, [pickle.dumps(message)], message["fds"])


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    code = 0
    try:
        serve(sock)
    except BaseException:  # a bug or an interrupt: say what, and let the tracer see no answer
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Not a normal exit: bcc's atexit clean-up would detach the programs the tracer now holds.
    os._exit(code)


if __name__ == "__main__":
    main()
