"""The kernel source: compiles bpf/ with bcc per the hook plan, attaches, and delivers decoded events.

bcc is imported only by the loader process (loader.py) where the kernel has a ring buffer, and by this
module on older kernels: it costs ~130 MB and needs root, so report and replay never load it.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import pickle
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from tcptrace_bpf import wire
from tcptrace_bpf.events import KIND_NAMES, RESET_RECV, RESET_SENT, RETRANSMIT, STATE, TIMEWAIT, Event
from tcptrace_bpf.plan import Plan
from tcptrace_bpf.ringbuf import PerCpuCounters, RingReader

MISSES_EVERY = 0.5
# After a wake-up with little waiting, let a batch gather: each poll costs the tracer a fixed amount (the
# engine's timers, the sinks' ticks), which at a few thousand events/s would otherwise be paid per handful.
BATCH_BYTES = 256 * wire.RING_RECORD_SIZE
BATCH_WAIT_S = 0.01
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


# Programs whose every run is one event of a kind (by function name; bcc names them after the hook), so a
# run the kernel skipped is a lost event of that kind.  The others filter (a timer tracepoint sees every
# kernel timer, socket I/O every socket, tcp_write_wakeup window probes too, tcp_v4_send_reset full sockets
# too): a skipped run of theirs may not have been an event.
_EVERY_RUN_AN_EVENT = (("inet_sock_set_state", STATE), ("tcp_retransmit_skb", RETRANSMIT),
                       ("tcp_send_reset", RESET_SENT), ("tcp_receive_reset", RESET_RECV),
                       ("inet_twsk", TIMEWAIT), ("tw_timer_handler", TIMEWAIT))


def program_kind(name: str) -> Optional[int]:
    """The event kind each run of program `name` emits, or None for a program that filters."""
    for hook, kind in _EVERY_RUN_AN_EVENT:
        if hook in name:
            return kind
    return None


class SourceError(Exception):
    """The BPF programs could not be compiled, loaded or attached."""

    def __init__(self, why: str) -> None:
        super().__init__(f"loading the BPF programs failed: {why}")
        self.why = why


def _load(plan: Plan) -> Any:
    """bcc's BPF object for the plan, every program attached (bcc attaches TRACEPOINT_PROBE, kprobe__ and
    kfunc__ functions as it loads them).  On failure whatever was attached is detached again, and what bcc and
    the verifier printed is kept for the error instead of reaching the terminal: a refused fallback is
    expected, not news."""
    from bcc import BPF  # imported late: heavy, and only the live kernel source needs it

    bpf = BPF.__new__(BPF)
    with tempfile.TemporaryFile() as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            bpf.__init__(text=program_text(plan).encode(), cflags=plan.cflags())
            return bpf
        except Exception as exc:  # bcc raises bare Exception for compile, load and attach failures
            try:
                bpf.cleanup()
            except Exception:  # a half-built object: nothing more to free
                pass
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            why = lines[0] if lines else type(exc).__name__
            if "super-user" in why and os.geteuid() == 0:  # bcc's words for any EPERM
                why = "the kernel refused the program (EPERM) although we run as root"
            raise SourceError(why) from exc
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if plan.fallback is None:  # the last try: what went wrong matters to the user
                log.seek(0)
                text = log.read().decode(errors="replace")
                if "error" in text.lower() or "failed" in text.lower():
                    os.write(2, text[-4000:].encode())


def load_with_fallbacks(plan: Plan) -> tuple[Any, Plan]:
    """bcc's BPF object and the plan that loaded: where the kernel refuses the plan's phase hooks (fentry is
    refused on some kernels that have trampolines), the plan's fallback is loaded instead, noting why."""
    while True:
        try:
            return _load(plan), plan
        except SourceError as exc:
            if plan.fallback is None:
                raise
            plan = plan.falling_back(exc.why)


def _package_root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def spawn_loader(plan: Plan) -> dict[str, Any]:
    """Load the plan in a child process (loader.py) and take over the kernel objects it made: its answer,
    with "fds" turned into our descriptors and "maps"/"progs" into the same."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (_package_root(), env.get("PYTHONPATH"))))
    with ours:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "tcptrace_bpf.loader", str(theirs.fileno())],
                                    pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        try:
            ours.send(pickle.dumps(plan))
            data, fds, _flags, _addr = socket.recv_fds(ours, 1 << 20, 4096)
        except OSError:  # the loader died before it read the plan (what it printed is on stderr)
            data, fds = b"", []
        finally:
            proc.wait()
    if not data:
        raise SourceError(f"the loader process ended without an answer (exit code {proc.returncode})")
    answer = pickle.loads(data)
    if "error" in answer:
        for fd in fds:
            os.close(fd)
        raise SourceError(answer["error"])
    if len(fds) != len(answer["fds"]):
        for fd in fds:
            os.close(fd)
        raise SourceError(f"the loader sent {len(fds)} of {len(answer['fds'])} descriptors")
    mine = dict(zip(answer["fds"], fds))
    answer["fds"] = fds
    answer["maps"] = {name: mine[fd] for name, fd in answer["maps"].items()}
    answer["progs"] = {name: mine[fd] for name, fd in answer["progs"].items()}
    return answer


class KernelSource:
    """Loads the programs and turns ring/perf buffer records into Events (ts relative to `epoch_ns`).

    With a ring buffer (5.8+) the programs are loaded by a child process (spawn_loader) and read here without
    bcc; with a perf buffer, bcc stays in this process and its reader delivers the records.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.epoch_ns = 0
        self._bpf: Any = None
        self._ring: Optional[RingReader] = None
        self._lost_counters: Optional[PerCpuCounters] = None
        self._fds: list[int] = []
        self._progs: dict[str, int] = {}
        self._chunks: list[bytes] = []
        self._perf_lost = 0
        self._misses: dict[str, int] = {}
        self._misses_read = float("-inf")

    def start(self) -> None:
        """Compile, load and attach; `self.plan` becomes the plan that loaded (see load_with_fallbacks)."""
        if self.plan.ringbuf:
            answer = spawn_loader(self.plan)
            self.plan, self._fds, self._progs = answer["plan"], answer["fds"], answer["progs"]
            try:
                self._ring = RingReader(answer["maps"]["events"])
                self._lost_counters = PerCpuCounters(answer["maps"]["lost"])
            except (OSError, ValueError) as exc:
                self.close()
                raise SourceError(f"reading the ring buffer: {exc}") from exc
        else:
            self._start_perf()
        self.epoch_ns = time.monotonic_ns()

    def _start_perf(self) -> None:
        self._bpf, self.plan = load_with_fallbacks(self.plan)
        self._progs = {name.decode(): fn.fd for name, fn in self._bpf.funcs.items()}
        chunks = self._chunks
        size = wire.EVENT_SIZE

        def on_sample(_cpu: int, data: int, _size: int) -> None:
            chunks.append(ctypes.string_at(data, size))

        def on_lost(count: int) -> None:
            self._perf_lost += count
        self._bpf[b"events"].open_perf_buffer(on_sample, page_cnt=1024, lost_cb=on_lost)

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
        if self._ring is not None:
            self._ring.wait(timeout_ms)
            if timeout_ms > 0 and self._ring.pending() < BATCH_BYTES:
                time.sleep(BATCH_WAIT_S)
            data = self._ring.take(wire.RING_RECORD_SIZE)
            return wire.decode_ring(data, self.epoch_ns) if data else []
        self._bpf.perf_buffer_poll(timeout_ms)
        if not self._chunks:
            return []
        chunks, self._chunks[:] = list(self._chunks), []
        return wire.decode(chunks, self.epoch_ns)

    def lost(self) -> int:
        """Events not delivered so far, counting every skipped run of a filtering hook as one (see
        lost_detail): what the engine takes into account when it judges a lifecycle."""
        detail = self.lost_detail()
        return sum(detail["lost_by_kind"].values()) + detail["skipped_runs"]

    def lost_detail(self) -> dict[str, Any]:
        """What was not delivered, by what is certain: {"lost_by_kind": {kind name: events}, "skipped_runs": n}.

        lost_by_kind: failed ring-buffer reserves, counted by the programs per event kind; plus runs the kernel
        skipped of programs whose every run is an event (a tracepoint program is not run while another BPF
        program runs on that CPU, a softirq that interrupted one: counted per program as recursion_misses,
        5.12+, read from the program's fdinfo).  Perf-buffer losses and ring records of an unknown size are
        "unattributed".  skipped_runs: skipped runs of programs that filter (timer tracepoints see every
        kernel timer, socket I/O every socket): each may or may not have been an event.
        """
        sums: list[int] = []
        if self._lost_counters is not None:
            sums = self._lost_counters.sums()
        elif self._bpf is not None:
            table = self._bpf[b"lost"]
            sums = [int(table.sum(kind).value) for kind in range(len(table))]
        by_kind = {KIND_NAMES.get(kind, "unattributed"): count for kind, count in enumerate(sums) if count}
        unattributed = self._perf_lost + (self._ring.unknown if self._ring is not None else 0)
        if unattributed:
            by_kind["unattributed"] = by_kind.get("unattributed", 0) + unattributed
        skipped = 0
        if self._progs:
            now = time.monotonic()
            if now - self._misses_read >= MISSES_EVERY:  # fdinfo costs ~20 us a program: not every poll
                self._misses = {name: recursion_misses(fd) for name, fd in self._progs.items()}
                self._misses_read = now
            for name, count in self._misses.items():
                kind = program_kind(name)
                if kind is None:
                    skipped += count
                elif count:
                    by_kind[KIND_NAMES[kind]] = by_kind.get(KIND_NAMES[kind], 0) + count
        return {"lost_by_kind": by_kind, "skipped_runs": skipped}

    def close(self) -> None:
        """Detach everything: close the descriptors (ring buffer path) or let bcc clean up (perf path)."""
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        self._lost_counters = None
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        self._progs = {}
