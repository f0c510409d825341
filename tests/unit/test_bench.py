"""The benchmark's own arithmetic: what the "hooks only" phase counts, and how the goals table reads it.

The benchmark is not run in CI (it measures, it does not gate), but the numbers it prints decide what the
team believes about performance, so the parts that compute them are tested like the product.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tcptrace_bpf import wire
from tcptrace_bpf.events import OWNER, STATE, TIMEWAIT

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import hooks_only  # noqa: E402
import run  # noqa: E402


def ring_record(kind: int) -> bytes:
    """One ring record as the kernel lays it out (header bytes left zero: state_records does not read them)."""
    return wire.RING_STRUCT.pack(123, 0xFFFF0001, 42, 0, kind, 2, 1000, 80, 1, 2,
                                 b"\0" * 16, b"\0" * 16, b"churn".ljust(16, b"\0"))


def test_state_records_counts_only_state_changes() -> None:
    data = b"".join(ring_record(kind) for kind in (STATE, OWNER, STATE, TIMEWAIT, STATE, STATE))
    assert hooks_only.state_records(data) == 4
    assert hooks_only.state_records(b"") == 0


def test_state_records_reads_the_kind_field_not_other_bytes() -> None:
    # A record whose other fields hold the byte value of STATE everywhere but in kind.
    odd = wire.RING_STRUCT.pack(STATE, STATE, STATE, STATE, OWNER, STATE, STATE, STATE, STATE, STATE,
                                bytes([STATE]) * 16, bytes([STATE]) * 16, bytes([STATE]) * 16)
    assert hooks_only.state_records(odd * 3) == 0


def phase(kind: str, connections: int) -> run.Phase:
    return run.Phase(kind=kind, round=0, target_rate=None, connections=connections, seconds=10.0, errors=0,
                     port=1, machine_busy_pct=99.0, steal_pct=0.0, lost=0, delivered=10 * connections,
                     expected=10 * connections, ready_s=1.0, rss_mb=100.0, peak_rss_mb=120.0)


def test_goals_show_the_hooks_only_bound_and_whether_the_ratio_is_within_it() -> None:
    phases = [phase(run.UNTRACED, 200_000), phase(run.HOOKS, 170_000), phase(run.TCPTRACE, 100_000)]
    text = run.goals(phases, None, untraced_rate=20_000.0)
    ratio_row = next(line for line in text.splitlines() if line.startswith("max churn: traced"))
    bound_row = next(line for line in text.splitlines() if "BPF hooks alone" in line)
    assert "0.50x" in ratio_row and ratio_row.rstrip().endswith("NO")
    assert "0.85x" in bound_row and bound_row.rstrip().endswith("out of reach")
    phases[1] = phase(run.HOOKS, 190_000)
    bound_row = next(line for line in run.goals(phases, None, 20_000.0).splitlines() if "BPF hooks alone" in line)
    assert "0.95x" in bound_row and bound_row.rstrip().endswith("reachable")


def test_goals_without_a_hooks_only_phase_have_no_bound_row() -> None:
    text = run.goals([phase(run.UNTRACED, 200_000), phase(run.TCPTRACE, 100_000)], None, 20_000.0)
    assert "hooks alone" not in text
