"""The engine's input: one small record per kernel fact, whatever the source (kernel, recording, snapshot).

Kinds and state numbers are the kernel's (include/net/tcp_states.h); names are what users read.
"""

from __future__ import annotations

import errno
from typing import NamedTuple, Optional

STATE = 1
RETRANSMIT = 2
RESET_SENT = 3
RESET_RECV = 4
OWNER = 5
TIMEWAIT = 6   # old = tw_substate, new = TIMER_START/CANCEL/EXPIRE, err = jiffies left on the timer
KEEPALIVE = 7  # new = KA_PROBE, old = probes sent and not answered (this one included)

TIMER_START, TIMER_CANCEL, TIMER_EXPIRE, KA_PROBE = 1, 2, 3, 4
KIND_NAMES = {STATE: "state", RETRANSMIT: "retransmit", RESET_SENT: "reset_sent", RESET_RECV: "reset_received",
              OWNER: "owner", TIMEWAIT: "timewait", KEEPALIVE: "keepalive"}
TCP_TIMEWAIT_LEN = 60.0  # seconds; fixed in Linux (include/net/tcp.h), not a sysctl

STATE_NAMES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
STATE_NUMBERS = {name: num for num, name in STATE_NAMES.items()}
ESTABLISHED, SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT = 1, 2, 3, 4, 5, 6
CLOSE, CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING = 7, 8, 9, 10, 11


def state_name(num: int) -> str:
    return STATE_NAMES.get(num, f"STATE_{num}")


def errno_name(err: int) -> Optional[str]:
    """Symbolic name of a positive errno (sk_err), None for 0."""
    if err <= 0:
        return None
    return errno.errorcode.get(err, f"E{err}")


def errno_number(name: Optional[str]) -> int:
    if not name:
        return 0
    if name.startswith("E") and name[1:].isdigit():
        return int(name[1:])
    return getattr(errno, name, 0)


class Event(NamedTuple):
    """One kernel fact.  `ts` is seconds on the source's clock; `sock` the kernel socket address.

    `pid`/`comm` are the task that was running when the hook fired: the engine decides whether that task
    is the socket's owner.  `err` is sk_err at a ->CLOSE (0 otherwise) or the reset reason (-1: unknown).
    """

    ts: float
    kind: int
    sock: int
    old: int = 0
    new: int = 0
    family: int = 0
    laddr: str = ""
    lport: int = 0
    raddr: str = ""
    rport: int = 0
    pid: int = 0
    comm: str = ""
    err: int = 0
