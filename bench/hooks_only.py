#!/usr/bin/env python3
"""The benchmark's "hooks only" phase: tcptrace-bpf's BPF programs with a reader that does no work.

    hooks_only.py --output FILE     (run by bench/run.py, as root; SIGINT stops it)

It loads and attaches exactly what `tcptrace-bpf record` would on this kernel (the same plan, the same loader
process and fallbacks), then empties the ring buffer every 10 ms without decoding anything: no engine, no
recording, no writes.  So the load's throughput beside it is the best any frontend could reach with these
hooks, and the gap to the tcptrace-bpf phase is what the frontend costs.  The buffer is emptied on a timer,
not on the kernel's wake-ups: a reader that is always caught up would be woken for nearly every record, which
costs the load far more than the hooks do (measured: half its throughput), and the real tracer, which works
between reads, is woken about once per batch.

It writes {"type": "ready"} to FILE once every probe is attached, and at the end a footer with what the ring
buffer carried: records, state changes (counted from each record's kind field, not decoded), and the lost
counts tcptrace-bpf's own footer would give (lost_by_kind, skipped_runs).
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from the checkout without the package installed
    sys.path.insert(0, str(REPO))

from tcptrace_bpf import wire  # noqa: E402
from tcptrace_bpf.events import STATE  # noqa: E402
from tcptrace_bpf.kernel import KernelSource  # noqa: E402
from tcptrace_bpf.plan import make_plan  # noqa: E402
from tcptrace_bpf.probe import probe_kernel  # noqa: E402

EVERY_S = 0.01
# Where the kind field's low byte sits in a ring record (little-endian): after the kernel's record header
# and the fields before it in wire.EVENT_FIELDS.
KIND_OFFSET = wire.RING_RECORD_SIZE - wire.EVENT_SIZE + struct.calcsize(
    "<" + "".join(code for name, code in itertools.takewhile(lambda f: f[0] != "kind", wire.EVENT_FIELDS)))


def state_records(data: bytes) -> int:
    """State-change records in a slice of whole ring records, from the low byte of each kind field."""
    return data[KIND_OFFSET::wire.RING_RECORD_SIZE].count(STATE)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", type=Path, required=True)
    args = ap.parse_args()
    stopping: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    plan = make_plan(probe_kernel())
    if plan.fatal:
        first = next(p for p in plan.problems if p.fatal)
        print(f"cannot trace: {first.what} (fix: {first.fix})", file=sys.stderr)
        return 1
    source = KernelSource(plan)
    source.start()
    ring = source._ring  # the reader this phase replaces: ours to empty
    if ring is None:
        source.close()
        print("hooks only needs a ring buffer (kernel 5.8+)", file=sys.stderr)
        return 1
    with open(args.output, "w") as out:
        out.write(json.dumps({"type": "ready", "hooks": source.plan.hooks}) + "\n")
        out.flush()
        records = states = 0
        while True:
            done = bool(stopping)
            data = ring.take(wire.RING_RECORD_SIZE)
            records += len(data) // wire.RING_RECORD_SIZE
            states += state_records(data)
            if done:
                break
            time.sleep(EVERY_S)
        detail: dict[str, Any] = source.lost_detail()
        source.close()
        out.write(json.dumps({"type": "footer", "records": records, "state": states, **detail}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
