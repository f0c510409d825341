"""Report: time spent per state, close kinds, stuck CLOSE_WAIT, TIME_WAIT per peer, troubled sockets.

Reads connection records (one per socket lifetime) and the header/footer; pure aggregation so it is tested
on hand-made records, and rendered either as rich tables or as JSON.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from rich.console import Console
from rich.table import Table

from tcptrace_bpf.engine import CLOSE_KINDS
from tcptrace_bpf.events import STATE_NAMES
from tcptrace_bpf.filters import NO_FILTER, Filter
from tcptrace_bpf.recording import EVENT_TYPES, read_records

# Sources whose durations are measurements.  "inferred" intervals (FIN_WAIT2 handed to the timewait socket)
# end where the kernel stopped showing them, not where the state ended: they are counted, never averaged in.
MEASURED_SOURCES = ("exact", "peer", "polled")
STATE_ORDER = [STATE_NAMES[n] for n in (10, 2, 3, 1, 4, 5, 8, 11, 9, 6)]
TOP = 10


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (a value that was really observed)."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def endpoint(addr: Optional[str], port: Optional[int]) -> str:
    addr = addr or "?"
    return f"[{addr}]:{port or '?'}" if ":" in addr else f"{addr}:{port or '?'}"


@dataclass
class Report:
    name: str
    header: Optional[dict[str, Any]] = None
    footer: Optional[dict[str, Any]] = None
    truncated: Optional[int] = None  # line number of a torn last line
    last_ts: float = 0.0
    connections: int = 0
    durations: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unmeasured: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    sources: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    close_kinds: Counter = field(default_factory=Counter)
    # (seconds held, still open at the end, record); an open one's seconds are known only in finish()
    close_wait: list[tuple[float, bool, dict[str, Any]]] = field(default_factory=list)
    _open_close_wait: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    _cw_heap: list[tuple[float, int, dict[str, Any]]] = field(default_factory=list)
    time_wait: Counter = field(default_factory=Counter)
    troubled: list[dict[str, Any]] = field(default_factory=list)

    def add(self, rec: dict[str, Any]) -> None:
        self.connections += 1
        self.close_kinds[rec.get("close") or "unknown"] += 1
        for st in rec["states"]:
            name = st.get("state")
            self.sources[name][st.get("source")] += 1
            if st.get("duration") is not None and st.get("source") in MEASURED_SOURCES:
                self.durations[name].append(st["duration"])
            else:
                self.unmeasured[name][st.get("source")] += 1
            if name == "CLOSE_WAIT":
                if st.get("duration") is not None:
                    # keep only the TOP longest: a recording can hold millions of passive closes
                    item = (st["duration"], self.connections, rec)  # the count breaks ties: dicts do not compare
                    if len(self._cw_heap) < TOP:
                        heapq.heappush(self._cw_heap, item)
                    elif item[0] > self._cw_heap[0][0]:
                        heapq.heapreplace(self._cw_heap, item)
                elif st.get("enter") is not None and st.get("leave") is None:
                    self._open_close_wait.append((st["enter"], rec))
            if name == "TIME_WAIT":
                self.time_wait[endpoint(rec.get("raddr"), rec.get("rport"))] += 1
        if rec.get("retransmits") or rec.get("resets_sent") or rec.get("resets_received"):
            self.troubled.append(rec)

    def finish(self) -> None:
        end = self.footer["ts"] if self.footer and self.footer.get("ts") is not None else self.last_ts
        self.close_wait = [(dur, False, rec) for dur, _seq, rec in self._cw_heap]
        self.close_wait.extend((end - enter, True, rec) for enter, rec in self._open_close_wait)
        self.close_wait.sort(key=lambda item: -item[0])
        del self.close_wait[TOP:]
        self.troubled.sort(key=lambda r: -(r.get("retransmits", 0) + r.get("resets_sent", 0)
                                           + r.get("resets_received", 0)))

    def state_rows(self) -> list[dict[str, Any]]:
        rows = []
        for name in STATE_ORDER:
            values = sorted(self.durations.get(name, []))
            count = sum(self.sources[name].values()) if name in self.sources else 0
            if not count:
                continue
            row: dict[str, Any] = {"state": name, "count": count, "measured": len(values),
                                   "sources": dict(self.sources[name])}
            if values:
                row.update(p50=percentile(values, 50), p90=percentile(values, 90),
                           p99=percentile(values, 99), max=values[-1])
            else:
                row.update(p50=None, p90=None, p99=None, max=None)
            rows.append(row)
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "recording": self.name,
            "kernel": (self.header or {}).get("kernel"),
            "hooks": (self.header or {}).get("hooks"),
            "complete": self.footer is not None,
            "truncated_line": self.truncated,
            "lost_events": (self.footer or {}).get("lost_events"),
            "connections": self.connections,
            "states": self.state_rows(),
            "close": {kind: self.close_kinds[kind] for kind in CLOSE_KINDS if self.close_kinds[kind]},
            "longest_close_wait": [
                {**_who(rec), "seconds": round(dur, 6), "still_open": still_open}
                for dur, still_open, rec in self.close_wait
            ],
            "time_wait_by_peer": [{"peer": peer, "count": n} for peer, n in self.time_wait.most_common(TOP)],
            "troubled": [
                {**_who(rec), "retransmits": rec.get("retransmits", 0), "resets_sent": rec.get("resets_sent", 0),
                 "resets_received": rec.get("resets_received", 0), "close": rec.get("close")}
                for rec in self.troubled[:TOP]
            ],
        }


def _who(rec: dict[str, Any]) -> dict[str, Any]:
    return {"local": endpoint(rec.get("laddr"), rec.get("lport")),
            "remote": endpoint(rec.get("raddr"), rec.get("rport")),
            "pid": rec.get("pid"), "comm": rec.get("comm")}


def build_report(lines: Iterable[str], name: str, flt: Filter = NO_FILTER) -> Report:
    """Aggregate a recording.  Raises RecordingError (file:line) on a bad line."""
    report = Report(name)
    # Per-event lines (5 in 6 of a recording) are not used by the report: they are checked for shape only
    # (read_records' skim), which keeps the report above 200k lines/s.
    for lineno, rec in read_records(lines, name, skim=EVENT_TYPES):  # type: ignore[arg-type]
        kind = rec["type"]
        ts = rec.get("ts")
        if isinstance(ts, (int, float)) and ts > report.last_ts:
            report.last_ts = ts
        if kind == "connection":
            if flt.empty or flt.match(rec):
                report.add(rec)
        elif kind == "header":
            report.header = rec
        elif kind == "footer":
            report.footer = rec
        elif kind == "truncated":
            report.truncated = lineno
    report.finish()
    return report


def fmt_seconds(value: Optional[float]) -> str:
    if value is None:
        return "-"
    if round(value * 1e6) < 1000:
        return f"{value * 1e6:.0f}us"
    if round(value * 1e3, 1) < 1000:
        return f"{value * 1e3:.1f}ms"
    return f"{value:.2f}s"


def render(report: Report, console: Console) -> None:
    data = report.as_dict()
    lost = data["lost_events"]
    console.print(f"[bold]{report.name}[/]: {data['connections']} connections, kernel {data['kernel'] or '?'}, "
                  f"lost events: {'unknown (no footer)' if lost is None else lost}")
    if report.truncated:
        console.print(f"[yellow]line {report.truncated} is torn (the recorder crashed?): ignored[/]")
    if report.footer is None:
        console.print("[yellow]no footer: the recording did not end cleanly; sockets open at the end "
                      "have no connection record[/]")
    console.print("\n[bold]Time in state[/]")
    table = Table()
    for col in ("state", "count", "measured", "p50", "p90", "p99", "max", "how measured"):
        table.add_column(col, justify="left" if col in ("state", "how measured") else "right", no_wrap=True)
    for row in data["states"]:
        how = ", ".join(f"{src} {n}" for src, n in sorted(row["sources"].items()))
        table.add_row(row["state"], str(row["count"]), str(row["measured"]), fmt_seconds(row["p50"]),
                      fmt_seconds(row["p90"]), fmt_seconds(row["p99"]), fmt_seconds(row["max"]), how)
    console.print(table)
    console.print("Close kinds: " + (", ".join(f"{k} {n}" for k, n in data["close"].items()) or "none"))
    if data["longest_close_wait"]:
        console.print("\n[bold]Longest CLOSE_WAIT (the application did not call close())[/]")
        t = Table()
        for col in ("local", "remote", "pid", "comm", "CLOSE_WAIT"):
            t.add_column(col)
        for row in data["longest_close_wait"]:
            held = (">= " if row["still_open"] else "") + fmt_seconds(row["seconds"])
            t.add_row(row["local"], row["remote"], str(row["pid"] or "?"), row["comm"] or "?", held)
        console.print(t)
    if data["time_wait_by_peer"]:
        console.print("\n[bold]TIME_WAIT entered, per remote endpoint (inferred)[/]")
        t = Table()
        t.add_column("remote")
        t.add_column("count", justify="right")
        for row in data["time_wait_by_peer"]:
            t.add_row(row["peer"], str(row["count"]))
        console.print(t)
    if data["troubled"]:
        console.print("\n[bold]Sockets with retransmits or resets[/]")
        t = Table()
        for col in ("local", "remote", "pid", "comm", "retrans", "RST sent", "RST recv", "close"):
            t.add_column(col)
        for row in data["troubled"]:
            t.add_row(row["local"], row["remote"], str(row["pid"] or "?"), row["comm"] or "?",
                      str(row["retransmits"]), str(row["resets_sent"]), str(row["resets_received"]),
                      row["close"] or "?")
        console.print(t)
