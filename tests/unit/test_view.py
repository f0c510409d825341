"""The live view on fixed engine states and a fake clock, rendered into a string at a fixed width."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tcptrace_bpf.diagnose import Diagnosis
from tcptrace_bpf.engine import Engine
from tcptrace_bpf.filters import NO_FILTER, Filter
from tcptrace_bpf.live import LiveApp
from tcptrace_bpf.replay import RecordingSource
from tcptrace_bpf.view import History, render, sparkline, take_snapshot

from .recordings import record
from .streams import CLOSE, ESTABLISHED, SYN_SENT, client_active_close, server_passive_close, st


def text_of(renderable, width=140):
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, force_terminal=False).print(renderable)
    return out.getvalue()


def snapshot(engine, now, closes=(), **kw):
    args = dict(uptime=now, hooks="sock:inet_sock_set_state", lost=0, events=engine.events, history=History(),
                flt=NO_FILTER, sort="in-state", state_filter=None, limit=10, paused=False, diagnoses=[])
    args.update(kw)
    return take_snapshot(engine.open.values(), closes, now, **args)


def stuck_engine():
    engine = Engine()
    for ev in server_passive_close(t0=1.0, hold=99)[:4]:  # server stuck in CLOSE_WAIT since 2.01
        engine.feed(ev)
    for ev in [st(10, 0xB000, CLOSE, SYN_SENT, pid=5, comm="curl", lport=0, rport=443),
               st(10.2, 0xB000, SYN_SENT, ESTABLISHED, lport=41000, rport=443)]:
        engine.feed(ev)
    return engine


def table_lines(text):
    start = text.index("open sockets:")
    return text[start:].splitlines()


def test_sockets_sorted_by_time_in_state():
    snap = snapshot(stuck_engine(), now=32.01)
    text = text_of(render(snap))
    lines = table_lines(text)
    assert lines[0].startswith("open sockets: 3 of 3 shown, sorted by in-state")
    assert lines[2].split()[:5] == ["10.0.0.2:80", "10.0.0.1:40000", "nginx[200]", "CLOSE_WAIT", "30.0s"]
    assert lines[3].split()[:6] == ["10.0.0.1:41000", "10.0.0.2:443", "curl[5]", "ESTABLISHED", "21.8s", "22.0s"]
    # listeners sit in LISTEN by design: they sort after the sockets that may be stuck
    assert lines[4].split()[:2] == ["0.0.0.0:80", "*"] and "LISTEN" in lines[4]


def test_state_counts_and_trend():
    engine = stuck_engine()
    history = History()
    for now in (30.0, 31.0, 32.0):
        snap = snapshot(engine, now=now, history=history)
    text = text_of(render(snap))
    counts = text[text.index("state"):text.index("diagnoses")]
    assert "LISTEN         1  ███" in counts and "CLOSE_WAIT     1  ███" in counts
    assert sparkline([0, 1, 2, 4]) == "▁▂▄█" and sparkline([0, 0]) == "▁▁"


def test_rows_bounded_by_limit_not_by_sockets():
    engine = Engine()
    for i in range(1000):
        engine.feed(st(i * 0.001, 0x10000 + i, CLOSE, SYN_SENT, pid=1, comm="x", rport=80))
    snap = snapshot(engine, now=5, limit=7)
    assert len(snap.rows) == 7 and snap.matching == 1000 and snap.counts == {"SYN_SENT": 1000}
    assert "open sockets: 7 of 1000 shown" in text_of(render(snap))


def test_state_filter_and_sort_keys():
    engine = stuck_engine()
    snap = snapshot(engine, now=32, state_filter="ESTABLISHED")
    assert [r.state for r in snap.rows] == ["ESTABLISHED"] and snap.counts["CLOSE_WAIT"] == 1
    snap = snapshot(engine, now=32, sort="age")
    assert snap.rows[0].state == "LISTEN"


def test_pid_filter_applies_to_rows_and_counts():
    snap = snapshot(stuck_engine(), now=32, flt=Filter(pid=5))
    assert [r.owner for r in snap.rows] == ["curl[5]"] and snap.counts == {"ESTABLISHED": 1}


def test_recent_closes_show_timeline_and_kind():
    engine = Engine()
    done = []
    for ev in client_active_close(t0=1.0):
        engine.feed(ev)
    done += engine.advance(5)
    text = text_of(render(snapshot(engine, now=5, closes=done)), width=180)
    line = next(ln for ln in text.splitlines() if "curl[100]" in ln and "active" in ln)
    assert "SYN_SENT 10.0ms > ESTABLISHED 1.00s > FIN_WAIT1 20.0ms > FIN_WAIT2 ~>=10us > TIME_WAIT ~entered" in line


def test_header_lost_events_and_diagnoses():
    snap = snapshot(stuck_engine(), now=32, lost=17, diagnoses=[Diagnosis("critical", "CLOSE_WAIT piling up", "9")])
    text = text_of(render(snap))
    assert "lost 17" in text and "sockets 3" in text and "!! CLOSE_WAIT piling up: 9" in text
    quiet = text_of(render(snapshot(stuck_engine(), now=32)))
    assert "lost 0" in quiet and "maybe" not in quiet and "diagnoses: nothing stands out" in quiet
    unsure = text_of(render(snapshot(stuck_engine(), now=32, lost=17, skipped=5)))
    assert "lost 17 (5 maybe not events)" in unsure


def test_keys_cycle_sort_filter_pause_quit():
    app = LiveApp(RecordingSource(io.StringIO(""), "empty"), NO_FILTER, {}, limits=None)
    assert app.key("s") and app.sort == "age"
    assert app.key("f") and app.state_filter == "LISTEN"
    assert app.key("p") and app.paused
    assert app.key("q") is False


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_replay_frame_by_frame():
    """A recording replayed at speed 1 through the live app, frames taken at chosen replay times."""
    text = record(server_passive_close(t0=1.0, hold=0.5) + client_active_close(t0=4.0), end=8)
    clock = FakeClock()
    source = RecordingSource(io.StringIO(text), "r.jsonl", speed=1.0, clock=clock, sleep=lambda _s: None)
    app = LiveApp(source, NO_FILTER, {"state": "replay"}, started=0)
    app.tracer.begin({})

    def frame(at):
        clock.t = 100.0 + at
        app.tracer.step(0)
        return app.snapshot(height=60)

    f = frame(0.5)
    assert f.counts == {"LISTEN": 1} and [r.state for r in f.rows] == ["LISTEN"]
    f = frame(1.5)
    assert f.counts == {"LISTEN": 1, "ESTABLISHED": 1}
    f = frame(2.2)
    assert f.counts["CLOSE_WAIT"] == 1
    assert next(r for r in f.rows if r.state == "CLOSE_WAIT").in_state == pytest.approx(2.2 - 2.01)
    f = frame(3.0)  # LAST_ACK -> CLOSE at 2.52, final after the 0.25 s grace
    assert "CLOSE_WAIT" not in f.counts and f.closes[0][2] == "passive"
    f = frame(4.5)
    assert f.counts == {"LISTEN": 1, "ESTABLISHED": 1}
    f = frame(7.0)
    kinds = [c[2] for c in f.closes]
    assert kinds == ["active", "passive"] and f.lost == 0 and source.finished
    assert "curl[100]" in text_of(render(f), width=200)
    app.paused = True
    assert app.snapshot(60) is f  # paused: the frame stays as it was


def test_the_header_line_names_every_hook_kind():
    from tcptrace_bpf.live import short_hooks

    line = short_hooks({"state": "raw tracepoint sock:inet_sock_set_state",
                        "time_wait": "exact: fentry __inet_twsk_schedule/inet_twsk_deschedule_put/tw_timer_handler",
                        "keepalive": "exact: kprobe tcp_write_wakeup with mib LINUX_MIB_TCPKEEPALIVE",
                        "retransmit": "inferred: nothing"})
    assert line == ("sock:inet_sock_set_state, __inet_twsk_schedule/inet_twsk_deschedule_put/tw_timer_handler, "
                    "tcp_write_wakeup, retransmit inferred")
