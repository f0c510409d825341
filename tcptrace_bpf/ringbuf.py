"""Reading a BPF ring buffer map straight from its memory, and per-CPU counters with one syscall: no bcc.

bcc's reader calls back into Python once per record through ctypes, which at connection-storm rates costs
more than decoding the record.  The ring buffer is memory the kernel shares with us (the layout libbpf
uses, kernel/bpf/ringbuf.c): one writable page holding the consumer position, then a read-only page holding
the producer position, then the data area mapped twice in a row, so any span of it up to its size reads as
one contiguous slice even where it wraps.  Each record has an 8-byte header: its length, with a busy bit
while the program is still filling it and a discard bit when it gave it up.  We take every committed record
between the consumer and producer positions as one bytes object, decode it in one pass (wire.decode_ring),
and then move the consumer position on, which frees the space for the kernel.

x86-64 orders these loads and stores as the kernel's acquire/release pairs need; the other architectures
this could run on would want explicit barriers, which Python cannot express.  Kernels without a ring buffer
(before 5.8) use bcc's perf buffer reader instead (kernel.py).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select
import struct
from pathlib import Path

BUSY = 1 << 31
DISCARD = 1 << 30
HEADER = 8
_POS = struct.Struct("<Q")
_HDR = struct.Struct("<I")

SYS_BPF = 321  # x86-64
BPF_MAP_LOOKUP_ELEM = 1


def fdinfo(fd: int) -> dict[str, str]:
    """The kernel's description of a BPF object fd (map_type, max_entries, prog_tag, recursion_misses...)."""
    out = {}
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            key, _, value = line.partition(":")
            out[key.strip()] = value.strip()
    return out


def possible_cpus() -> int:
    """How many CPUs a per-CPU map has a slot for: /sys/devices/system/cpu/possible, e.g. "0-3" or "0,2-3"."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class _LookupAttr(ctypes.Structure):
    """The part of union bpf_attr that BPF_MAP_LOOKUP_ELEM reads."""

    _fields_ = [("map_fd", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("key", ctypes.c_uint64),
                ("value", ctypes.c_uint64), ("flags", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


class PerCpuCounters:
    """A BPF_MAP_TYPE_PERCPU_ARRAY of u64 (the `lost` counters, one slot per event kind), summed over CPUs."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.slots = int(fdinfo(fd)["max_entries"])
        self._key = ctypes.c_uint32(0)
        self._values = (ctypes.c_uint64 * possible_cpus())()
        self._attr = _LookupAttr(map_fd=fd, key=ctypes.addressof(self._key),
                                 value=ctypes.addressof(self._values))

    def sums(self) -> list[int]:
        """Each slot's total over the CPUs."""
        out = []
        for slot in range(self.slots):
            self._key.value = slot
            if _libc.syscall(SYS_BPF, BPF_MAP_LOOKUP_ELEM, ctypes.byref(self._attr),
                             ctypes.sizeof(self._attr)) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"reading a per-CPU counter: {os.strerror(err)}")
            out.append(sum(self._values))
        return out


class RingReader:
    """Consumer of one BPF_MAP_TYPE_RINGBUF map, given its fd (which it does not own)."""

    def __init__(self, fd: int) -> None:
        info = fdinfo(fd)
        if info.get("map_type") != "27":  # BPF_MAP_TYPE_RINGBUF
            raise ValueError(f"fd {fd} is not a ring buffer map (map_type {info.get('map_type')})")
        self.size = int(info["max_entries"])
        self.mask = self.size - 1
        page = mmap.PAGESIZE
        self._page = page
        self._consumer = mmap.mmap(fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._producer = mmap.mmap(fd, page + 2 * self.size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self.unknown = 0  # records of a size we do not emit: skipped, counted

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (committed or still being filled)."""
        return _POS.unpack_from(self._producer, 0)[0] - _POS.unpack_from(self._consumer, 0)[0]

    def wait(self, timeout_ms: int) -> None:
        """Sleep until the kernel signals data or `timeout_ms` passes; not at all when data is waiting.  The
        kernel wakes a reader only when it had caught up, so data already there must be taken first."""
        if timeout_ms > 0 and self.pending() == 0:
            self._poll.poll(timeout_ms)

    def take(self, record_size: int) -> bytes:
        """Every committed record from the consumer position on (see committed()), and the space they used
        given back to the kernel."""
        cons = _POS.unpack_from(self._consumer, 0)[0]
        prod = _POS.unpack_from(self._producer, 0)[0]
        if prod == cons:
            return b""
        start = self._page + (cons & self.mask)
        records, used, unknown = committed(self._producer[start:start + (prod - cons)], record_size)
        self.unknown += unknown
        _POS.pack_into(self._consumer, 0, cons + used)
        return records

    def close(self) -> None:
        self._consumer.close()
        self._producer.close()


def committed(data: bytes, record_size: int) -> tuple[bytes, int, int]:
    """(records, bytes used, unknown) for ring buffer `data` from the consumer position on: the committed
    records as one bytes object of whole records, each `record_size` bytes with its header; how far the
    consumer may move on; and how many records of another size were skipped.

    A record still being filled (busy) ends the batch.  A discarded one is skipped, as is one of another size
    (counted: our programs emit one size only).  Whole runs of well-formed records are taken as one slice;
    headers are still read one by one, because a busy one can follow any committed one.
    """
    parts, pos, end, unknown = [], 0, len(data), 0
    expected = record_size - HEADER
    while pos < end:
        run = pos
        while run < end and _HDR.unpack_from(data, run)[0] == expected:
            run += record_size
        if run > pos:
            parts.append(data[pos:run])
            pos = run
        if pos >= end:
            break
        length = _HDR.unpack_from(data, pos)[0]
        if length & BUSY:
            break
        if not length & DISCARD:
            unknown += 1
        pos += ((length & ~(BUSY | DISCARD)) + HEADER + 7) & ~7
    return (parts[0] if len(parts) == 1 else b"".join(parts)), pos, unknown
