"""Diagnoses for the live view: the TCP problems people run this tool for, each with its evidence.

Pure: fed events and finished lifecycles (with their own timestamps), asked for diagnoses at a time `now`.
Windows are one minute of event time.  Thresholds are module constants so tests and readers see them.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import dataclass
from typing import Iterable, Optional

from tcptrace_bpf.engine import Lifecycle
from tcptrace_bpf.events import CLOSE_WAIT, FIN_WAIT2, RETRANSMIT, STATE, SYN_SENT, Event

WINDOW = 60.0
CLOSE_WAIT_PILE = 5          # sockets in CLOSE_WAIT in one process...
CLOSE_WAIT_OLD = 10.0        # ...or one held this long
TIME_WAIT_PORT_SHARE = 0.5   # TIME_WAITs to one peer, as a share of the local port range
TIME_WAIT_BUCKET_SHARE = 0.5  # TIME_WAITs in all, as a share of tcp_max_tw_buckets
SYN_SENT_PEERS = 10          # distinct peers one process tried to reach in a minute
FIN_WAIT2_HELD = 5.0         # seconds in FIN_WAIT2: the peer is not closing
RETRANS_HOT = 10             # retransmits to one peer in a minute
TIMEOUT_KILLS = 1            # connections closed by timeout in a minute


@dataclass(frozen=True)
class Diagnosis:
    severity: str  # "warning" or "critical"
    title: str
    evidence: str


@dataclass(frozen=True)
class HostLimits:
    """Sysctls the diagnoses compare against (read by the app, passed in: the diagnoser does no I/O)."""

    port_range: int = 28232  # net.ipv4.ip_local_port_range size (Linux default 32768-60999)
    max_tw_buckets: int = 262144


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def who(pid: Optional[int], comm: Optional[str]) -> str:
    return f"{comm or '?'}[{pid if pid is not None else '?'}]"


def age(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


class Diagnoser:
    def __init__(self, limits: Optional[HostLimits] = None) -> None:
        self.limits = limits or HostLimits()
        self._tw: deque[tuple[float, str]] = deque()            # TIME_WAIT entries: (ts, peer)
        self._syn: deque[tuple[float, str, str]] = deque()      # connect attempts: (ts, owner, peer)
        self._retrans: deque[tuple[float, str]] = deque()       # (ts, peer)
        self._timeouts: deque[tuple[float, str, str]] = deque()  # (ts, peer, owner)

    # --- intake (called from the intake path: keep it O(1)) ------------------------------------------
    def event(self, ev: Event, lc: Optional[Lifecycle]) -> None:
        if ev.kind == RETRANSMIT and ev.raddr:
            self._retrans.append((ev.ts, endpoint(ev.raddr, ev.rport)))
        elif ev.kind == STATE and ev.new == SYN_SENT and lc is not None and ev.raddr:
            self._syn.append((ev.ts, who(lc.pid, lc.comm), endpoint(ev.raddr, ev.rport)))

    def finished(self, lc: Lifecycle) -> None:
        if lc.end is None:
            return
        peer = endpoint(lc.raddr, lc.rport)
        if lc.timewait:
            self._tw.append((lc.end, peer))
        if lc.close_kind() == "timeout":
            self._timeouts.append((lc.end, peer, who(lc.pid, lc.comm)))

    def _expire(self, now: float) -> None:
        limit = now - WINDOW
        for window in (self._tw, self._syn, self._retrans, self._timeouts):
            while window and window[0][0] < limit:
                window.popleft()

    # --- output --------------------------------------------------------------------------------------
    def diagnose(self, open_sockets: Iterable[Lifecycle], now: float) -> list[Diagnosis]:
        """Everything: diagnose_open() then diagnose_windows()."""
        return self.diagnose_open(open_sockets, now) + self.diagnose_windows(now)

    def diagnose_open(self, open_sockets: Iterable[Lifecycle], now: float) -> list[Diagnosis]:
        """From the open sockets alone (a scan: the live view runs it outside the intake lock)."""
        out: list[Diagnosis] = []
        close_wait: dict[str, list[float]] = defaultdict(list)
        fin_wait2: list[tuple[float, Lifecycle]] = []
        for lc in open_sockets:
            if lc.state == CLOSE_WAIT and lc.transitions:
                close_wait[who(lc.pid, lc.comm)].append(now - lc.transitions[-1][0])
            elif lc.state == FIN_WAIT2 and lc.transitions and now - lc.transitions[-1][0] >= FIN_WAIT2_HELD:
                fin_wait2.append((now - lc.transitions[-1][0], lc))
        for owner, ages in sorted(close_wait.items(), key=lambda item: -len(item[1])):
            if len(ages) >= CLOSE_WAIT_PILE or max(ages) >= CLOSE_WAIT_OLD:
                out.append(Diagnosis(
                    "critical" if len(ages) >= CLOSE_WAIT_PILE else "warning",
                    f"CLOSE_WAIT piling up in {owner}: the application does not call close()",
                    f"{len(ages)} sockets in CLOSE_WAIT, oldest {age(max(ages))}"))
        if fin_wait2:
            held, lc = max(fin_wait2, key=lambda item: item[0])
            out.append(Diagnosis("warning", "FIN_WAIT2 held: the peer never closes its side",
                                 f"{len(fin_wait2)} sockets in FIN_WAIT2 over {FIN_WAIT2_HELD:.0f}s, longest "
                                 f"{age(held)} ({endpoint(lc.laddr, lc.lport)} -> {endpoint(lc.raddr, lc.rport)}, "
                                 f"{who(lc.pid, lc.comm)})"))
        return out

    def diagnose_windows(self, now: float) -> list[Diagnosis]:
        """From the last minute of events (the windows change with intake: call under the intake lock)."""
        self._expire(now)
        out: list[Diagnosis] = []
        tw_by_peer = Counter(peer for _ts, peer in self._tw)
        if tw_by_peer:
            peer, count = tw_by_peer.most_common(1)[0]
            share = count / self.limits.port_range
            total = len(self._tw)
            if share >= TIME_WAIT_PORT_SHARE:
                out.append(Diagnosis("critical", f"TIME_WAIT to {peer}: local ports running out",
                                     f"{count} entered in the last minute (each lasts 60s) against "
                                     f"{self.limits.port_range} local ports ({share:.0%})"))
            if total >= TIME_WAIT_BUCKET_SHARE * self.limits.max_tw_buckets:
                out.append(Diagnosis("critical", "TIME_WAIT near tcp_max_tw_buckets",
                                     f"{total} entered in the last minute, limit {self.limits.max_tw_buckets}: "
                                     "beyond it the kernel skips TIME_WAIT"))
        peers_by_owner: dict[str, set[str]] = defaultdict(set)
        for _ts, owner, peer in self._syn:
            peers_by_owner[owner].add(peer)
        for owner, peers in sorted(peers_by_owner.items(), key=lambda item: -len(item[1])):
            if len(peers) >= SYN_SENT_PEERS:
                out.append(Diagnosis("warning", f"{owner} connects to many peers: a scan, or an unreachable "
                                     "dependency", f"{len(peers)} distinct peers in the last minute, e.g. "
                                     + ", ".join(sorted(peers)[:3])))
        retrans = Counter(peer for _ts, peer in self._retrans)
        for peer, count in retrans.most_common(3):
            if count >= RETRANS_HOT:
                out.append(Diagnosis("warning", f"retransmissions to {peer}",
                                     f"{count} retransmitted segments in the last minute"))
        if len(self._timeouts) >= TIMEOUT_KILLS:
            peers = Counter(peer for _ts, peer, _owner in self._timeouts)
            peer, count = peers.most_common(1)[0]
            out.append(Diagnosis("warning", "connections killed by timeout (keepalive, RTO or SYN retries)",
                                 f"{len(self._timeouts)} in the last minute, most to {peer} ({count})"))
        return out
