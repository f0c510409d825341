"""The live view, as pure functions: engine state -> Snapshot -> rich renderables.

Taking a snapshot is the only step that touches the engine (the caller holds the intake lock for it) and
is bounded by what fits on screen: one pass over the open sockets for the state counts and a heap for the
top rows.  Rendering works on the snapshot alone, so it runs outside the lock and is tested with fixed
snapshots and a fake clock.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from tcptrace_bpf.diagnose import Diagnosis, age, endpoint, who
from tcptrace_bpf.engine import Lifecycle
from tcptrace_bpf.events import LISTEN, STATE_NAMES, STATE_NUMBERS, state_name
from tcptrace_bpf.filters import Filter
from tcptrace_bpf.text import timeline

STATES = [STATE_NAMES[n] for n in (10, 2, 3, 1, 4, 5, 8, 11, 9, 6)]
SORTS = ("in-state", "age", "retrans", "resets", "state")
SPARK = "▁▂▃▄▅▆▇█"
TREND_POINTS = 60


def _in_state_since(lc: Lifecycle) -> Optional[float]:
    return lc.phase()[1]


def _first_seen(lc: Lifecycle) -> Optional[float]:
    if lc.start is not None:
        return lc.start
    return lc.transitions[0][0] if lc.transitions else None


_SORT_KEYS: dict[str, Callable[[Lifecycle], Any]] = {
    # largest first: oldest in state (listeners, which sit in LISTEN by design, after the others) / oldest /
    # most retransmits / most resets / state order
    "in-state": lambda lc: (lc.state != LISTEN, -(_in_state_since(lc) or 0.0) if lc.transitions else float("-inf")),
    "age": lambda lc: -(_first_seen(lc) or 0.0),
    "retrans": lambda lc: lc.retransmits,
    "resets": lambda lc: lc.resets_sent + lc.resets_received,
    "state": lambda lc: -STATES.index(state_name(lc.phase()[0])) if state_name(lc.phase()[0]) in STATES else -99,
}


@dataclass
class Row:
    local: str
    remote: str
    owner: str
    state: str
    in_state: Optional[float]
    age: Optional[float]
    age_known: bool
    retransmits: int
    resets: str
    keepalive: Optional[int]


@dataclass
class Snapshot:
    now: float
    uptime: float
    hooks: str
    events_per_sec: float
    lost: int
    tracked: int
    paused: bool
    sort: str
    state_filter: Optional[str]
    counts: dict[str, int]
    trends: dict[str, list[int]]
    rows: list[Row]
    matching: int
    closes: list[tuple[float, str, str, str]]  # (end, endpoints, close kind, timeline)
    diagnoses: list[Diagnosis]
    notice: str = ""
    skipped: int = 0  # of `lost`: skipped runs of filtering hooks, which may not have been events


@dataclass
class History:
    """Per-second samples of state counts (for trends) and of the event counter (for events/s)."""

    counts: dict[str, deque[int]] = field(default_factory=dict)
    events: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=5))
    last_sample: float = float("-inf")

    def sample(self, now: float, counts: dict[str, int], events: int) -> None:
        if now - self.last_sample < 1.0:
            return
        self.last_sample = now
        for name in STATES:
            self.counts.setdefault(name, deque(maxlen=TREND_POINTS)).append(counts.get(name, 0))
        self.events.append((now, events))

    def rate(self) -> float:
        if len(self.events) < 2:
            return 0.0
        (t0, e0), (t1, e1) = self.events[0], self.events[-1]
        return (e1 - e0) / (t1 - t0) if t1 > t0 else 0.0


def row_of(lc: Lifecycle, now: float) -> Row:
    since = _in_state_since(lc)
    first = _first_seen(lc)
    return Row(
        local=endpoint(lc.laddr or "?", lc.lport), remote=endpoint(lc.raddr, lc.rport) if lc.rport else "*",
        owner=who(lc.pid, lc.comm), state=state_name(lc.phase()[0]),
        in_state=None if since is None else now - since, age=None if first is None else now - first,
        age_known=lc.start is not None, retransmits=lc.retransmits,
        resets=f"{lc.resets_sent}/{lc.resets_received}", keepalive=lc.keepalive_probes,
    )


def take_snapshot(open_sockets: Iterable[Lifecycle], closes: Iterable[Lifecycle], now: float, *, uptime: float,
                  hooks: str, lost: int, events: int, history: History, flt: Filter, sort: str,
                  state_filter: Optional[str], limit: int, paused: bool,
                  diagnoses: list[Diagnosis], skipped: int = 0) -> Snapshot:
    by_state: dict[int, int] = {}
    chosen: list[Lifecycle] = []
    tracked = 0
    filtering = not flt.empty
    wanted = STATE_NUMBERS.get(state_filter or "")
    for lc in open_sockets:
        tracked += 1
        if filtering and not flt.match(lc, partial=True):
            continue
        state = lc.state if lc.tw_state is None else lc.phase()[0]
        by_state[state] = by_state.get(state, 0) + 1
        if wanted is None or state == wanted:
            chosen.append(lc)
    counts = {state_name(state): n for state, n in by_state.items()}
    history.sample(now, counts, events)
    top = heapq.nlargest(limit, chosen, key=_SORT_KEYS[sort])
    recent = [(lc.end if lc.end is not None else lc.last_ts,
               f"{endpoint(lc.laddr or '?', lc.lport)} -> {endpoint(lc.raddr, lc.rport) if lc.rport else '*'} "
               f"{who(lc.pid, lc.comm)}", lc.close_kind(), timeline(lc.intervals())) for lc in closes]
    return Snapshot(
        now=now, uptime=uptime, hooks=hooks, events_per_sec=history.rate(), lost=lost, tracked=tracked,
        paused=paused, sort=sort, state_filter=state_filter, counts=counts,
        trends={name: list(values) for name, values in history.counts.items()},
        rows=[row_of(lc, now) for lc in top], matching=len(chosen), closes=recent, diagnoses=diagnoses,
        skipped=skipped,
    )


def sparkline(values: list[int], width: int = 20) -> str:
    values = values[-width:]
    if not values:
        return ""
    top = max(values)
    if top == 0:
        return SPARK[0] * len(values)
    return "".join(SPARK[min(len(SPARK) - 1, v * (len(SPARK) - 1) // top)] for v in values)


def fmt_age(value: Optional[float], known: bool = True) -> str:
    if value is None:
        return "?"
    return ("" if known else ">=") + age(value)


def render_header(snap: Snapshot) -> Text:
    text = Text()
    text.append("tcptrace-bpf live", style="bold")
    text.append(f"  up {age(snap.uptime)}  {snap.events_per_sec:,.0f} events/s  ")
    text.append(f"lost {snap.lost}", style="bold red" if snap.lost else "green")
    if snap.skipped:  # counted lost to be safe, but a filtering hook's skipped run may not have been an event
        text.append(f" ({snap.skipped} maybe not events)", style="red")
    text.append(f"  sockets {snap.tracked}")
    if snap.paused:
        text.append("  PAUSED", style="bold yellow")
    if snap.notice:
        text.append(f"  {snap.notice}", style="yellow")
    text.append(f"\nhooks: {snap.hooks}", style="dim")
    return text


def render_counts(snap: Snapshot) -> Table:
    table = Table(box=None, show_header=True, pad_edge=False, header_style="bold")
    table.add_column("state")
    table.add_column("now", justify="right")
    table.add_column("last minute")
    for name in STATES:
        count = snap.counts.get(name, 0)
        trend = snap.trends.get(name, [])
        if count or any(trend):
            table.add_row(name, str(count), sparkline(trend))
    return table


def render_sockets(snap: Snapshot) -> Table:
    title = f"open sockets: {len(snap.rows)} of {snap.matching} shown, sorted by {snap.sort}"
    if snap.state_filter:
        title += f", state {snap.state_filter}"
    table = Table(title=title, title_justify="left", box=None, header_style="bold", pad_edge=False)
    for col, justify in (("local", "left"), ("remote", "left"), ("process", "left"), ("state", "left"),
                         ("in state", "right"), ("age", "right"), ("retr", "right"), ("rst s/r", "right"),
                         ("ka", "right")):
        table.add_column(col, justify=justify, no_wrap=True, overflow="ellipsis")
    for row in snap.rows:
        table.add_row(row.local, row.remote, row.owner, row.state, fmt_age(row.in_state),
                      fmt_age(row.age, row.age_known), str(row.retransmits), row.resets,
                      "-" if row.keepalive is None else str(row.keepalive))
    return table


def render_closes(snap: Snapshot, limit: int) -> Table:
    table = Table(title="recent closes", title_justify="left", box=None, header_style="bold", pad_edge=False)
    table.add_column("sockets", no_wrap=True, overflow="ellipsis", min_width=40)
    table.add_column("close", no_wrap=True, min_width=12)
    table.add_column("lifecycle (= peer, % polled, ~ inferred, ? before trace, ! lost events)", no_wrap=True,
                     overflow="ellipsis")
    for _end, where, kind, line in snap.closes[:limit]:
        table.add_row(where, kind, line)
    return table


def render_diagnoses(snap: Snapshot) -> RenderableType:
    if not snap.diagnoses:
        return Text("diagnoses: nothing stands out", style="green")
    text = Text()
    for i, diag in enumerate(snap.diagnoses):
        if i:
            text.append("\n")
        text.append("!! " if diag.severity == "critical" else " ! ",
                    style="bold red" if diag.severity == "critical" else "yellow")
        text.append(diag.title, style="bold")
        text.append(f": {diag.evidence}")
    return text


KEYS_HELP = "keys: s sort  f filter state  p pause  q quit"


def render(snap: Snapshot, closes_shown: int = 5) -> Group:
    """The whole screen; the snapshot already holds only the socket rows that fit (rows_that_fit)."""
    return Group(
        render_header(snap), Text(""), render_counts(snap), Text(""), render_diagnoses(snap), Text(""),
        render_sockets(snap), Text(""), render_closes(snap, closes_shown), Text(KEYS_HELP, style="dim"),
    )


def rows_that_fit(height: int, snap_counts: int, diagnoses: int, closes_shown: int = 5) -> int:
    """Socket rows that fit under the fixed parts of the screen (at least 3)."""
    fixed = 2 + 1 + (1 + snap_counts) + 1 + max(1, diagnoses) + 1 + 2 + 1 + (2 + closes_shown) + 1
    return max(3, height - fixed)
