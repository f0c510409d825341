"""Decoding of `struct tt_event` (bpf/tcptrace.h), the one record the BPF programs emit.

EVENT_FIELDS mirrors the C struct; tests/unit/test_wire.py checks it against the header so the two cannot
drift.  Decoding is batched with struct.iter_unpack and addresses are memoised, because at connection-storm
rates the per-event cost in Python is what decides whether the tracer keeps up.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Iterable, Iterator

from tcptrace_bpf.events import Event

# (C field name, struct code); order and sizes as in bpf/tcptrace.h.
EVENT_FIELDS = (
    ("ts_ns", "Q"), ("skaddr", "Q"), ("pid", "I"), ("err", "i"), ("kind", "H"), ("family", "H"),
    ("sport", "H"), ("dport", "H"), ("oldstate", "B"), ("newstate", "B"), ("pad", "6x"),
    ("saddr", "16s"), ("daddr", "16s"), ("comm", "16s"),
)
EVENT_STRUCT = struct.Struct("<" + "".join(code for _name, code in EVENT_FIELDS))
EVENT_SIZE = EVENT_STRUCT.size
# A ring buffer record as it sits in the map: the kernel's 8-byte header (length, flags, page offset), then
# the event.  EVENT_SIZE is a multiple of 8, so records follow each other with no padding.
RING_STRUCT = struct.Struct("<8x" + "".join(code for _name, code in EVENT_FIELDS))
RING_RECORD_SIZE = RING_STRUCT.size

_AF_INET = socket.AF_INET
_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_ZERO16 = b"\0" * 16
_addr_cache: dict[bytes, str] = {}
_comm_cache: dict[bytes, str] = {}


def format_addr(raw: bytes) -> str:
    """IPv6 bytes to text, IPv4-mapped addresses shown as IPv4 ("" for the all-zero address)."""
    text = _addr_cache.get(raw)
    if text is None:
        if raw == _ZERO16:
            text = ""
        elif raw[:12] == _V4_MAPPED:
            text = socket.inet_ntop(socket.AF_INET, raw[12:])
        else:
            text = socket.inet_ntop(socket.AF_INET6, raw)
        if len(_addr_cache) > 65536:
            _addr_cache.clear()
        _addr_cache[raw] = text
    return text


def _comm(raw: bytes) -> str:
    text = _comm_cache.get(raw)
    if text is None:
        text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
        if len(_comm_cache) > 8192:
            _comm_cache.clear()
        _comm_cache[raw] = text
    return text


def family_of(af: int, laddr: str, raddr: str) -> int:
    """4 or 6 as users mean it: an AF_INET6 socket talking IPv4-mapped counts as 4."""
    if af == socket.AF_INET:
        return 4
    if af == socket.AF_INET6:
        return 4 if (":" not in laddr and ":" not in raddr and (laddr or raddr)) else 6
    return 0


def decode(chunks: Iterable[bytes], epoch_ns: int) -> list[Event]:
    """Events from raw records; `ts` becomes seconds since `epoch_ns` (CLOCK_MONOTONIC)."""
    return _events(EVENT_STRUCT.iter_unpack(b"".join(chunks)), epoch_ns)


def decode_ring(data: bytes, epoch_ns: int) -> list[Event]:
    """Events from ring buffer records, headers included (ringbuf.RingReader.take)."""
    return _events(RING_STRUCT.iter_unpack(data), epoch_ns)


def _events(rows: Iterator[tuple[Any, ...]], epoch_ns: int) -> list[Event]:
    """The per-event loop of the intake path, so written for speed: cache lookups inline, and the Event
    tuple built directly (a NamedTuple's keyword-capable constructor costs more than the rest together)."""
    out: list[Event] = []
    append, make = out.append, tuple.__new__
    addr, comms = _addr_cache.get, _comm_cache.get
    for (ts_ns, sk, pid, err, kind, af, sport, dport, old, new, saddr, daddr, comm) in rows:
        laddr = addr(saddr)
        if laddr is None:
            laddr = format_addr(saddr)
        raddr = addr(daddr)
        if raddr is None:
            raddr = format_addr(daddr)
        name = comms(comm)
        if name is None:
            name = _comm(comm)
        family = 4 if af == _AF_INET else family_of(af, laddr, raddr)
        append(make(Event, ((ts_ns - epoch_ns) / 1e9, kind, sk, old, new, family, laddr, sport, raddr, dport,
                            pid, name, err)))
    return out
