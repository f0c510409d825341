"""The JSON Lines schema: what the Recorder writes, and what the reader accepts or rejects."""

from __future__ import annotations

import io
import json

import pytest

from tcptrace_bpf.filters import Filter
from tcptrace_bpf.recording import RecordingError, read_records

from .recordings import record
from .streams import CLIENT_SK, RESET_SENT, client_active_close, other, server_passive_close


def parse(text):
    return [rec for _n, rec in read_records(io.StringIO(text), "t.jsonl")]


def test_round_trip_header_transitions_connections_footer():
    recs = parse(record(client_active_close() + [other(RESET_SENT, 3.0, 0, err=1)], end=10))
    assert recs[0]["type"] == "header" and recs[0]["schema"] == 1
    assert recs[-1]["type"] == "footer" and recs[-1]["lost_events"] == 0
    transitions = [r for r in recs if r["type"] == "transition"]
    assert [(t["from"], t["to"]) for t in transitions] == [
        ("CLOSE", "SYN_SENT"), ("SYN_SENT", "ESTABLISHED"), ("ESTABLISHED", "FIN_WAIT1"),
        ("FIN_WAIT1", "FIN_WAIT2"), ("FIN_WAIT2", "CLOSE")]
    assert transitions[0]["sock"] == hex(CLIENT_SK) and transitions[0]["pid"] == 100
    assert transitions[0]["pid_source"] == "connect" and transitions[0]["lport"] is None
    (reset,) = [r for r in recs if r["type"] == "reset"]
    assert reset["sock"] is None and reset["direction"] == "sent" and reset["reason"] == "NO_SOCKET"
    (conn,) = [r for r in recs if r["type"] == "connection"]
    assert conn["close"] == "active" and conn["role"] == "client" and conn["family"] == 4
    assert conn["states"][-1] == {"state": "TIME_WAIT", "enter": 2.03001, "leave": None, "duration": None,
                                  "source": "inferred"}
    assert conn["states"][1]["duration"] == pytest.approx(1.0)
    assert set(conn) >= {"sock", "family", "laddr", "lport", "raddr", "rport", "pid", "comm", "role", "start",
                         "end", "states", "retransmits", "resets_sent", "resets_received", "keepalive_probes",
                         "close"}
    assert all(list(r)[0] == "type" for r in recs)


def test_open_sockets_written_at_the_end():
    recs = parse(record(server_passive_close()[:4], end=10))
    conns = {r["role"]: r for r in recs if r["type"] == "connection"}
    assert conns["server"]["close"] == "open" and conns["server"]["end"] is None
    assert conns["server"]["states"][-1]["state"] == "CLOSE_WAIT"
    assert conns["listener"]["close"] == "open"


def test_filter_keeps_matching_sockets_only():
    events = client_active_close() + server_passive_close(t0=5)
    recs = parse(record(events, end=20, flt=Filter(lport=80)))
    conns = [r for r in recs if r["type"] == "connection"]
    assert {c["role"] for c in conns} == {"server", "listener"}
    assert recs[0]["filters"] == {"lport": 80}


@pytest.mark.parametrize("line, message", [
    ("not json\n", "t.jsonl:2: not JSON"),
    ("[1, 2]\n", "t.jsonl:2: not a JSON object"),
    ('{"type": "bogus"}\n', "t.jsonl:2: unknown record type 'bogus'"),
    ('{"type": "transition", "ts": 1}\n', "t.jsonl:2: transition record lacks sock, from, to"),
    ('{"type": "transition", "ts": 1, "sock": "0x1", "from": "X", "to": "CLOSE"}\n', "t.jsonl:2: unknown TCP state"),
])
def test_bad_line_names_file_and_line(line, message):
    text = json.dumps({"type": "header", "schema": 1}) + "\n" + line
    with pytest.raises(RecordingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(text)


def test_future_schema_is_refused():
    with pytest.raises(RecordingError, match="schema 2 is not supported"):
        parse('{"type": "header", "schema": 2}\n')


def test_torn_last_line_is_tolerated_and_reported():
    text = record(client_active_close(), end=10, footer=False)
    torn = text + '{"type": "transition", "ts": 3.1, "so'
    recs = parse(torn)
    assert recs[-1]["type"] == "truncated"
    # the same torn text in the middle of a file is an error
    with pytest.raises(RecordingError):
        parse(torn + "\n" + text)


def test_port_filter_excludes_other_listeners_and_socketless_resets():
    from .streams import LISTEN_SK, st

    events = [st(0, LISTEN_SK, 7, 10, laddr="127.0.0.1", lport=5555, raddr="", rport=0, pid=1, comm="x"),
              other(RESET_SENT, 0.5, LISTEN_SK, old=10, err=1, lport=5555, raddr="", rport=0),
              other(RESET_SENT, 0.6, 0, err=1, lport=9, rport=4444)]
    recs = parse(record(events, end=5, flt=Filter(port=80)))
    assert [r["type"] for r in recs] == ["header", "footer"]


def test_fast_lines_are_the_same_records():
    """transition_line and timewait_line build text for the hot path; event_record is the reference."""
    import json as _json

    from tcptrace_bpf.engine import Engine
    from tcptrace_bpf.events import TIME_WAIT, TIMER_CANCEL, TIMER_EXPIRE, TIMER_START, TIMEWAIT
    from tcptrace_bpf.recording import event_record, timewait_line, transition_line

    engine = Engine(timers=True)
    tw = other(TIMEWAIT, 2.5, 0xFFFF9999, old=TIME_WAIT, err=15000)
    stream = (client_active_close() + [tw._replace(new=TIMER_START), tw._replace(ts=3.0, new=TIMER_CANCEL),
                                       tw._replace(ts=3.0, new=TIMER_START), tw._replace(ts=62.5, new=TIMER_EXPIRE),
                                       tw._replace(ts=63.0, sock=0xFFFF7777, new=TIMER_START, lport=1)]
              + [ev._replace(comm='we"ird\\name', err=104) for ev in client_active_close(9)])
    kinds = set()
    for ev in stream:
        lc = engine.feed(ev)
        line = {1: transition_line, TIMEWAIT: timewait_line}.get(ev.kind)
        if line is not None:
            kinds.add((ev.kind, lc is not None))
            assert _json.loads(line(ev, lc)) == event_record(ev, lc, {})
            assert list(_json.loads(line(ev, lc))) == list(event_record(ev, lc, {}))
    assert kinds == {(1, True), (TIMEWAIT, True), (TIMEWAIT, False)}  # with and without a lifecycle
    # a timewait socket adopted from the snapshot: its lifecycle has no kernel address (negative), so null
    from tcptrace_bpf.engine import Lifecycle

    adopted = Lifecycle(-1, None, TIME_WAIT, None)
    ev = tw._replace(new=TIMER_EXPIRE)
    assert _json.loads(timewait_line(ev, adopted)) == event_record(ev, adopted, {})
    assert _json.loads(timewait_line(ev, adopted))["sock"] is None


def test_skimmed_lines_are_still_checked_for_shape():
    text = record(client_active_close(), end=10)
    lines = text.splitlines(keepends=True)
    skim = frozenset(("transition",))
    kinds = [r["type"] for _n, r in read_records(io.StringIO(text), "t", skim=skim)]
    assert kinds.count("transition") == 5 and kinds[0] == "header"
    lines.insert(2, '{"type": "transition", "ts": 1.0, "sock": "0x1", broken\n')
    with pytest.raises(RecordingError, match="t:3: not JSON"):
        list(read_records(io.StringIO("".join(lines)), "t", skim=skim))


CONNECTION_KEYS = [
    "type", "sock", "family", "laddr", "lport", "raddr", "rport", "pid", "comm", "pid_source", "role", "start",
    "end", "states", "retransmits", "resets_sent", "resets_received", "keepalive_probes", "keepalive_unanswered",
    "close", "error", "time_wait", "time_wait_end", "tw", "gaps",
]


def test_connection_line_is_valid_json_with_the_schema_keys_in_order():
    """The connection record is built as text (the writer's hot path): escaping, nulls and key order."""
    from tcptrace_bpf.engine import Engine
    from tcptrace_bpf.recording import connection_line

    engine = Engine(grace=0)
    odd = 'we"ird\\name'
    for ev in [ev._replace(comm=odd, laddr="fd00::1", raddr="fd00::2", family=6, err=104 if ev.new == 7 else 0)
               for ev in client_active_close()]:
        engine.feed(ev)
    (lc,) = engine.advance(100.0)
    rec = json.loads(connection_line(lc))
    assert list(rec) == CONNECTION_KEYS
    assert rec["comm"] == odd and rec["laddr"] == "fd00::1" and rec["family"] == 6
    assert rec["sock"] == hex(CLIENT_SK) and rec["tw"] is None and rec["time_wait"] is False
    assert rec["error"] == "ECONNRESET" and rec["close"] == "reset" and rec["keepalive_probes"] is None
    assert [s["state"] for s in rec["states"]] == ["SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2"]
    assert rec["states"][1] == {"state": "ESTABLISHED", "enter": lc.intervals()[1].enter,
                                "leave": round(lc.intervals()[1].leave, 6),
                                "duration": round(lc.intervals()[1].duration, 6), "source": "exact"}
