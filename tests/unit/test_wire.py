"""The Python mirror of struct tt_event must match bpf/tcptrace.h, and decoding must be right."""

from __future__ import annotations

import re
import socket
import struct

from tcptrace_bpf.events import STATE
from tcptrace_bpf.kernel import bpf_dir
from tcptrace_bpf.wire import EVENT_FIELDS, EVENT_SIZE, EVENT_STRUCT, decode, format_addr

_C_SIZES = {"__u64": 8, "__u32": 4, "__s32": 4, "__u16": 2, "__u8": 1, "char": 1}
_PY_SIZES = {"Q": 8, "I": 4, "i": 4, "H": 2, "B": 1}


def c_fields():
    text = (bpf_dir() / "tcptrace.h").read_text()
    body = re.search(r"struct tt_event \{(.*?)\};", text, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    out = []
    for ctype, name, count in re.findall(r"(\w+)\s+(\w+)(?:\[(\w+)\])?;", body):
        n = 16 if count == "TT_COMM_LEN" else int(count or 1)
        out.append((name, _C_SIZES[ctype] * n))
    return out


def py_fields():
    out = []
    for name, code in EVENT_FIELDS:
        m = re.fullmatch(r"(\d*)([a-zA-Z])", code)
        count, letter = int(m.group(1) or 1), m.group(2)
        out.append((name, count * _PY_SIZES.get(letter, 1)))
    return out


def test_mirror_matches_header():
    assert py_fields() == c_fields()
    assert EVENT_SIZE == sum(size for _n, size in c_fields()) == 88


def test_decode_one_event():
    mapped = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("127.0.0.1")
    v6 = socket.inet_pton(socket.AF_INET6, "fd00::2")
    raw = EVENT_STRUCT.pack(2_500_000_000, 0xFFFF1234, 77, 111, STATE, socket.AF_INET6, 5000, 80, 2, 7,
                            mapped, v6, b"curl\0".ljust(16, b"\0"))
    (ev,) = decode([raw], epoch_ns=500_000_000)
    assert ev.ts == 2.0 and ev.sock == 0xFFFF1234 and ev.pid == 77 and ev.err == 111
    assert (ev.old, ev.new, ev.laddr, ev.lport, ev.raddr, ev.rport) == (2, 7, "127.0.0.1", 5000, "fd00::2", 80)
    assert ev.comm == "curl" and ev.family == 6


def test_ipv4_mapped_is_shown_as_ipv4_and_family_4():
    mapped = b"\0" * 10 + b"\xff\xff" + socket.inet_aton("10.1.2.3")
    raw = EVENT_STRUCT.pack(0, 1, 0, 0, STATE, socket.AF_INET6, 1, 2, 7, 2, mapped, mapped, b"x".ljust(16, b"\0"))
    (ev,) = decode([raw], 0)
    assert ev.laddr == "10.1.2.3" and ev.family == 4
    assert format_addr(b"\0" * 16) == ""
    assert struct.calcsize("<" + "".join(c for _n, c in EVENT_FIELDS)) == EVENT_SIZE


def test_kinds_and_phases_match_the_header():
    from tcptrace_bpf import events

    text = (bpf_dir() / "tcptrace.h").read_text()
    c_values = {name: int(value) for name, value in re.findall(r"\bTT_(\w+) = (\d+),", text)}
    python = {name: getattr(events, name) for name in ("STATE", "RETRANSMIT", "RESET_SENT", "RESET_RECV", "OWNER",
                                                        "TIMEWAIT", "KEEPALIVE", "TIMER_START", "TIMER_CANCEL",
                                                        "TIMER_EXPIRE", "KA_PROBE")}
    assert c_values == python
