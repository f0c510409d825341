"""The kernel source: compiles bpf/ with bcc per the hook plan, attaches, and delivers decoded events.

bcc is imported here only (it costs ~130 MB and needs root), so report and replay never load it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import re
import time
from pathlib import Path
from typing import Any, Optional

from tcptrace_bpf import wire
from tcptrace_bpf.events import Event
from tcptrace_bpf.plan import Plan

MISSES_EVERY = 0.5
_INCLUDE = re.compile(r'^#include "([^"]+)"\s*$', re.M)


def bpf_dir() -> Path:
    """The BPF sources: shipped inside the installed package as tcptrace_bpf.bpf, or the checkout's bpf/."""
    spec = importlib.util.find_spec("tcptrace_bpf.bpf")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if Path(location, "tcptrace.h").exists():
                return Path(location)
    return Path(__file__).resolve().parent.parent / "bpf"


def program_text(plan: Plan, directory: Optional[Path] = None) -> str:
    """One C text: the plan's sources with local includes inlined once each.

    bcc rewrites map calls (events.ringbuf_reserve, ...) only in the main file, so nothing may stay behind
    an #include of our own.
    """
    directory = directory or bpf_dir()
    seen: set[str] = set()

    def inline(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        text = (directory / name).read_text()
        return _INCLUDE.sub(lambda m: inline(m.group(1)), text)

    return "\n".join(inline(name) for name in plan.sources)


def recursion_misses(prog_fd: int) -> int:
    """Times the kernel skipped this program because of its recursion guard (0 where not reported)."""
    try:
        with open(f"/proc/self/fdinfo/{prog_fd}") as info:
            for line in info:
                if line.startswith("recursion_misses:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class SourceError(Exception):
    """The BPF programs could not be compiled, loaded or attached."""


class KernelSource:
    """Loads the programs and turns ring/perf buffer records into Events (ts relative to `epoch_ns`)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.epoch_ns = 0
        self._bpf: Any = None
        self._chunks: list[bytes] = []
        self._perf_lost = 0
        self._misses = 0
        self._misses_read = float("-inf")

    def start(self) -> None:
        from bcc import BPF  # imported late: heavy, and only the live kernel source needs it

        # TRACEPOINT_PROBE and kprobe__ functions are attached by bcc as the program loads.
        try:
            self._bpf = BPF(text=program_text(self.plan).encode(), cflags=self.plan.cflags())
        except Exception as exc:  # bcc raises bare Exception for compile, load and attach failures
            raise SourceError(f"loading the BPF programs failed: {str(exc).strip().splitlines()[0]}") from exc
        chunks = self._chunks
        size = wire.EVENT_SIZE
        table = self._bpf[b"events"]
        if self.plan.ringbuf:
            def on_event(_ctx: Any, data: int, _size: int) -> int:
                chunks.append(ctypes.string_at(data, size))
                return 0
            table.open_ring_buffer(on_event)
        else:
            def on_sample(_cpu: int, data: int, _size: int) -> None:
                chunks.append(ctypes.string_at(data, size))

            def on_lost(count: int) -> None:
                self._perf_lost += count
            table.open_perf_buffer(on_sample, page_cnt=1024, lost_cb=on_lost)
        self.epoch_ns = time.monotonic_ns()

    def snapshot(self) -> list[Any]:
        """Every TCP socket that exists now, with its owner (sock_diag): taken once the probes are attached,
        so nothing falls between the snapshot and the events."""
        from tcptrace_bpf import sockdiag

        return list(sockdiag.snapshot())

    def now(self) -> float:
        """Seconds since the epoch, on the same clock as event timestamps (CLOCK_MONOTONIC)."""
        return (time.monotonic_ns() - self.epoch_ns) / 1e9

    def poll(self, timeout_ms: int) -> list[Event]:
        if timeout_ms == 0:  # the final drain: make the next lost() read the skip counters afresh
            self._misses_read = float("-inf")
        if self.plan.ringbuf:
            self._bpf.ring_buffer_poll(timeout_ms)
        else:
            self._bpf.perf_buffer_poll(timeout_ms)
        if not self._chunks:
            return []
        chunks, self._chunks[:] = list(self._chunks), []
        return list(wire.decode(chunks, self.epoch_ns))

    def lost(self) -> int:
        """Events not delivered so far: failed ring-buffer reserves on every CPU (or perf-buffer losses), plus
        runs the kernel skipped.  A tracepoint program is not run when another BPF program is already
        running on that CPU (the per-CPU recursion guard: a softirq that interrupted one); the kernel counts
        those per program as recursion_misses (5.12+), read here from the program's fdinfo.
        """
        total = self._perf_lost
        if self._bpf is not None:
            total += int(self._bpf[b"lost"].sum(0).value)
            now = time.monotonic()
            if now - self._misses_read >= MISSES_EVERY:  # fdinfo costs ~20 us a program: not every poll
                self._misses = sum(recursion_misses(fn.fd) for fn in self._bpf.funcs.values())
                self._misses_read = now
            total += self._misses
        return total

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
