"""Taking records out of a ring buffer's memory: committed ones only, whole, in order."""

from __future__ import annotations

import struct

from tcptrace_bpf.ringbuf import BUSY, DISCARD, committed, possible_cpus

SIZE = 24  # a record of 16 bytes plus its 8-byte header


def rec(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("<II", len(payload) | flags, 0) + payload + b"\0" * (-len(payload) % 8)


def test_committed_records_are_taken_whole_and_in_order():
    data = rec(b"A" * 16) + rec(b"B" * 16) + rec(b"C" * 16)
    records, used, unknown = committed(data, SIZE)
    assert records == data and used == len(data) and unknown == 0


def test_a_record_being_filled_ends_the_batch():
    data = rec(b"A" * 16) + rec(b"B" * 16, BUSY) + rec(b"C" * 16)
    records, used, unknown = committed(data, SIZE)
    assert records == rec(b"A" * 16) and used == SIZE and unknown == 0


def test_discarded_and_foreign_records_are_skipped_the_foreign_counted():
    data = rec(b"A" * 16) + rec(b"x" * 16, DISCARD) + rec(b"odd" * 3) + rec(b"C" * 16)
    records, used, unknown = committed(data, SIZE)
    assert records == rec(b"A" * 16) + rec(b"C" * 16)
    assert used == len(data) and unknown == 1


def test_nothing_committed_moves_nothing():
    assert committed(rec(b"A" * 16, BUSY), SIZE) == (b"", 0, 0)
    assert committed(b"", SIZE) == (b"", 0, 0)


def test_possible_cpus_counts_this_machine():
    assert possible_cpus() >= 1
