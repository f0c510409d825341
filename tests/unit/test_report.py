"""Report aggregation and rendering (rich Console into a string at a fixed width)."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from tcptrace_bpf.report import build_report, percentile, render

from .recordings import record
from .streams import CLIENT_SK, RETRANSMIT, client_active_close, other, server_passive_close


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 90) == 90 and percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7.0


def many_connections():
    events = []
    for i in range(10):
        t0 = 10.0 * i + 1
        events += server_passive_close(t0=t0, hold=0.1 * (i + 1), listener=i == 0)
    events += client_active_close(t0=200) + [other(RETRANSMIT, 200.5, CLIENT_SK, old=1)]
    events.sort(key=lambda ev: ev.ts)
    return events


def test_state_percentiles_and_close_kinds():
    rep = build_report(io.StringIO(record(many_connections(), end=300)), "r.jsonl")
    data = rep.as_dict()
    rows = {row["state"]: row for row in data["states"]}
    cw = rows["CLOSE_WAIT"]
    assert cw["count"] == 10 and cw["measured"] == 10
    assert cw["p50"] == pytest.approx(0.5) and cw["p90"] == pytest.approx(0.9) and cw["max"] == pytest.approx(1.0)
    assert rows["TIME_WAIT"]["measured"] == 0 and rows["TIME_WAIT"]["sources"] == {"inferred": 1}
    # a FIN_WAIT2 handed to the timewait socket is a lower bound: counted, never in the percentiles
    assert rows["FIN_WAIT2"]["count"] == 1 and rows["FIN_WAIT2"]["measured"] == 0 and rows["FIN_WAIT2"]["p50"] is None
    assert data["close"] == {"passive": 10, "active": 1, "open": 1}
    assert data["longest_close_wait"][0]["seconds"] == pytest.approx(1.0)
    assert data["time_wait_by_peer"] == [{"peer": "10.0.0.2:80", "count": 1}]
    assert data["troubled"][0]["retransmits"] == 1
    assert data["complete"] and data["lost_events"] == 0


def test_still_open_close_wait_is_at_least_until_the_end():
    rep = build_report(io.StringIO(record(server_passive_close(t0=1)[:4], end=50)), "r.jsonl")
    (row,) = rep.as_dict()["longest_close_wait"]
    assert row["still_open"] and row["seconds"] == pytest.approx(50 - 2.01)


def test_render_text():
    rep = build_report(io.StringIO(record(many_connections(), end=300)), "r.jsonl")
    out = io.StringIO()
    render(rep, Console(file=out, width=120, color_system=None))
    text = out.getvalue()
    assert "r.jsonl: 12 connections, kernel 6.18-test, lost events: 0" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("│ CLOSE_WAIT"))
    assert "500.0ms" in line and "900.0ms" in line and "1.00s" in line and "exact 10" in line
    assert "Close kinds: active 1, passive 10, open 1" in text
    assert "Longest CLOSE_WAIT" in text and "TIME_WAIT entered, per remote endpoint" in text


def test_report_without_footer_says_so():
    rep = build_report(io.StringIO(record(client_active_close(), end=10, footer=False)), "r.jsonl")
    out = io.StringIO()
    render(rep, Console(file=out, width=120, color_system=None))
    assert "no footer" in out.getvalue() and "lost events: unknown" in out.getvalue()
