"""Delivery: records taken out of a ring buffer's memory (committed ones only, whole, in order), and which
skipped program runs count as lost events."""

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


def test_which_skipped_program_runs_are_certain_losses():
    """A run the kernel skipped is a lost event only for a program whose every run is one (by bcc's names)."""
    from tcptrace_bpf.events import RESET_SENT, STATE, TIMEWAIT
    from tcptrace_bpf.kernel import program_kind

    assert program_kind("raw_tracepoint__inet_sock_set_state") == STATE
    assert program_kind("tracepoint__tcp__tcp_send_reset") == RESET_SENT
    assert program_kind("kfunc____inet_twsk_schedule") == TIMEWAIT
    assert program_kind("kprobe__tw_timer_handler") == TIMEWAIT
    for filtering in ("raw_tracepoint__timer_start", "raw_tracepoint__sock_send_length",
                      "kprobe__tcp_write_wakeup", "kprobe__tcp_v4_send_reset", "kfunc__tcp_v6_send_reset"):
        assert program_kind(filtering) is None
