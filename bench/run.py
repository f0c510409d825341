#!/usr/bin/env python3
"""Connection-churn benchmark for tcptrace-bpf (issue 6): what tracing costs a machine at its maximum churn.

    sudo .venv/bin/python bench/run.py [--seconds 30] [--rounds 2] [--quick] [--rates 2000,4000]

It compiles bench/churn.c (a C load on loopback, bounded in time, that stops by itself) and runs it in phases,
side by side in one run: untraced, with tcptrace-bpf's BPF programs attached and a reader that does nothing
(bench/hooks_only.py: the kernel side's cost alone), traced by `tcptrace-bpf record --output FILE`, and traced
by bcc's tcpstates writing to a file when that tool is installed.  Phases are repeated in mirrored order (U H T S, then
S T H U, ...) because this machine is shared and noisy: drift over the run then weighs on every kind alike, and
each kind's throughput is the mean of its rounds.  Then it times `tcptrace-bpf report FILE --json` on a
recording, and prints one plain-text table plus the issue's goals with what was measured.

Why each number is measured the way it is:
- connections/s comes from the load itself (connections completed / seconds the clients ran), so it is the
  same measure with and without a tracer, and the ratio traced/untraced is the cost of tracing as seen by the
  workload: BPF programs in the kernel's TCP path plus the frontend's CPU taken from the machine.
- lost events come from the recording's footer (tcptrace-bpf), or for tcpstates from bcc's "Possibly lost N
  samples" lines plus its program's recursion_misses (runs the kernel skipped, which tcpstates never reports).
  "accounted" checks the counts are exact: this load makes a known number of events per connection (see
  churn.c), so events delivered + events reported lost must equal that number (100% = exact).
- tracer CPU is utime+stime from /proc/PID/stat over the load window only (100% = one core), so compiling the
  BPF programs at start-up is not averaged in; the footer's whole-run cpu_seconds is kept in --json output.
- RSS: VmRSS at the end of the load (the steady state), and the peak (ru_maxrss from wait4, the whole life,
  including bcc's compile at start-up).
- ready: from launching `record` until its header line is in the file (the header is written once every
  probe is attached).  tcpstates has no such line and its output is block-buffered, so it is made to write by
  small probe connections every 10 ms: its ready time is an upper bound within ~0.1 s.
- after the load, a tracer is stopped only once it is idle (its backlog worked off), so what it did not
  deliver is either in its lost count or missing from "accounted", whatever the tool does when stopped.
- a tracer left running by someone else (any process holding tracing BPF programs) would skew every phase:
  the benchmark warns about one at start.

Not a timed test: it exits 0 whatever it measures (CI does not gate on it), and non-zero only when it could
not measure.  Every process it starts runs in its own session and is stopped on every way out (end, error,
Ctrl-C, SIGTERM), tracers with SIGINT first so they detach their probes and write their footer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# What one churn.c connection produces (see churn.c): 10 state changes, plus for tcptrace-bpf one owner
# report per socket (its first send/recv: client send, server recv).  Used to check lost counts are exact.
TRANSITIONS_PER_CONNECTION = 10
EVENTS_PER_CONNECTION = TRANSITIONS_PER_CONNECTION + 2

# Issue 6's goals, shown next to what was measured (informative only: nothing gates on them).
GOAL_RATIO = 0.90
GOAL_READY_S = 2.0
GOAL_RSS_MB = 200.0
GOAL_REPORT_RPS = 200_000

UNTRACED, HOOKS, TCPTRACE, TCPSTATES = "untraced", "hooks only", "tcptrace-bpf", "tcpstates"


class Interrupted(Exception):
    """SIGTERM or SIGHUP reached the benchmark: unwind through the clean-up like Ctrl-C does."""


class BenchError(Exception):
    """Something needed for a measurement failed (a tracer did not start, the load failed, ...)."""


# --- processes ------------------------------------------------------------------------------------------


class Children:
    """Every process the benchmark starts, so that each one is stopped on any exit path.

    Each child gets its own session: Ctrl-C at the terminal then reaches only the benchmark, which stops its
    children in order (a tracer must get SIGINT and time to detach its probes and write its footer).
    """

    def __init__(self) -> None:
        self.procs: list[tuple[subprocess.Popen[bytes], int]] = []

    def start(self, argv: list[str], stop_signal: int = signal.SIGTERM, **kwargs: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(argv, start_new_session=True, **kwargs)
        self.procs.append((proc, stop_signal))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float) -> Optional[resource.struct_rusage]:
        """Ask `proc` to stop with its signal, SIGKILL after `timeout`; returns its rusage (None: not ours)."""
        sig = next((s for p, s in self.procs if p is proc), signal.SIGTERM)
        if proc.returncode is not None:  # already reaped (communicate): nothing to stop
            self.procs = [(p, s) for p, s in self.procs if p is not proc]
            return None
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
        usage = wait_rusage(proc, timeout)
        if usage is None:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            usage = wait_rusage(proc, 10)
        self.procs = [(p, s) for p, s in self.procs if p is not proc]
        return usage

    def wait(self, proc: subprocess.Popen[bytes], timeout: float) -> Optional[resource.struct_rusage]:
        """Wait for `proc` to end by itself; its rusage, or None (still running after `timeout`)."""
        usage = wait_rusage(proc, timeout)
        if proc.returncode is not None:
            self.procs = [(p, s) for p, s in self.procs if p is not proc]
        return usage

    def stop_all(self) -> None:
        for proc, _sig in list(self.procs):
            if proc.returncode is None:
                print(f"stopping pid {proc.pid} ({os.path.basename(str(proc.args[0]))})", file=sys.stderr)
            self.stop(proc, timeout=10)


def wait_rusage(proc: subprocess.Popen[bytes], timeout: float) -> Optional[resource.struct_rusage]:
    """Reap `proc` with wait4 to get its rusage (peak RSS over its whole life); None if still running."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.returncode is not None:
            return None  # reaped elsewhere: its rusage is gone
        try:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            proc.returncode = -1
            return None
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (all its threads), from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process, in MiB: parsed from /proc, so the benchmark needs no psutil."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            found[line[:5]] = int(line.split()[1]) / 1024
    return found.get("VmRSS", float("nan")), found.get("VmHWM", float("nan"))


def wait_idle(pid: int, limit: float) -> float:
    """Wait until `pid` is idle (its backlog worked off); returns the seconds waited, at most `limit`.

    A tracer that fell behind still holds events in its buffers when the load ends.  Stopping it only once it
    is idle means whatever it does not deliver is counted as lost, or shows as missing in "accounted", rather
    than depending on how each tool behaves when stopped mid-backlog (tcpstates exits without draining).
    Idle = none of its threads runnable in 5 samples 50 ms apart: a tracer starved of CPU by a busy machine
    is runnable ("R"), so it is not mistaken for one with nothing left to do, as a CPU-time test would.
    """
    started = time.monotonic()
    quiet = 0
    while time.monotonic() - started < limit and quiet < 5:
        time.sleep(0.05)
        quiet = 0 if any_runnable(pid) else quiet + 1
    return time.monotonic() - started


def any_runnable(pid: int) -> bool:
    """Whether a thread of `pid` is running or waiting for a CPU (state R in /proc/PID/task/TID/stat)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "stat").read_text()
        except OSError:
            continue
        if text[text.rindex(")") + 2] == "R":
            return True
    return False


def bpf_recursion_misses(pid: int) -> int:
    """Runs the kernel skipped, summed over the BPF programs `pid` holds (fdinfo `recursion_misses`).

    A tracepoint program does not run while another BPF program runs on that CPU (a softirq interrupting
    one): the event is lost without any buffer being full.  tcptrace-bpf counts these in its footer;
    tcpstates reports only perf-buffer losses, so the benchmark adds these to its count.
    """
    total = 0
    fddir = Path(f"/proc/{pid}/fdinfo")
    for info in fddir.iterdir():
        try:
            text = info.read_text()
        except OSError:
            continue
        if "prog_tag:" in text:
            for line in text.splitlines():
                if line.startswith("recursion_misses:"):
                    total += int(line.split()[1])
    return total


TRACING_PROG_TYPES = {2, 5, 17, 26}  # kprobe, tracepoint, raw_tracepoint, tracing (fentry/fexit)


def other_tracers() -> list[str]:
    """Processes holding tracing BPF programs ("pid comm"): a tracer left running skews every phase.

    Cgroup, socket and XDP programs (systemd and friends) are not counted: they are not in the TCP path here.
    """
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            for info in (proc / "fdinfo").iterdir():
                text = info.read_text()
                if "prog_type:" in text:
                    kind = int(text.split("prog_type:", 1)[1].split()[0])
                    if kind in TRACING_PROG_TYPES:
                        found.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
                        break
        except (OSError, ValueError):
            continue
    return found


def machine_cpu() -> tuple[int, int, int]:
    """(total, idle, steal) jiffies of the whole machine, to show how busy and how stolen a phase was."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(parts[:8])  # guest times are already inside user/nice
    return total, parts[3] + parts[4], parts[7]


def count_lines(path: Path) -> int:
    """Newlines in a (possibly GB-sized) file, in 4 MiB chunks."""
    n = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(1 << 22)
            if not chunk:
                return n
            n += chunk.count(b"\n")


def count_tcpstates_lines(path: Path, port: int) -> int:
    """tcpstates output lines about one port (local or remote): the load's lines, without the probes' or
    any other traffic's.  Columns are parsed from the right because the command name may hold spaces."""
    wanted = str(port).encode()
    n = 0
    with open(path, "rb") as fh:
        for line in fh:
            if wanted in line:
                parts = line.rsplit(None, 7)  # [.. LADDR, LPORT, RADDR, RPORT, OLD, ->, NEW, MS]
                if len(parts) == 8 and (parts[1] == wanted or parts[3] == wanted):
                    n += 1
    return n


def last_line(path: Path) -> str:
    """The last line of a file without reading it all (a recording can be gigabytes): the footer."""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - 65536))
        lines = fh.read().splitlines()
    return lines[-1].decode("utf-8", "replace") if lines else ""


# --- measurements ----------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One load run, and what the tracer watching it (if any) cost and reported."""

    kind: str
    round: int
    target_rate: Optional[float]
    connections: int
    seconds: float
    errors: int
    port: int  # the load's listening port
    machine_busy_pct: float
    steal_pct: float
    lost: Optional[int] = None
    kernel_skipped: Optional[int] = None  # recursion_misses of the tracer's programs (part of `lost`)
    delivered: Optional[int] = None  # events (tcptrace-bpf footer) or output lines (tcpstates)
    expected: Optional[int] = None  # what the load made, in the same unit as delivered + lost
    lost_accounted: Optional[int] = None  # the lost events of the kinds in `delivered` (None: all of `lost`)
    tracer_cpu_pct: Optional[float] = None  # during the load window, 100 = one core
    tracer_cpu_total_s: Optional[float] = None
    rss_mb: Optional[float] = None  # at the end of the load
    peak_rss_mb: Optional[float] = None  # whole life
    ready_s: Optional[float] = None
    drain_s: Optional[float] = None  # from the end of the load until the tracer went idle (its backlog)
    output_mb: Optional[float] = None
    other_tracers: list[str] = field(default_factory=list)  # "pid comm" of others tracing during the phase

    @property
    def rate(self) -> float:
        """Connections per second as the load saw them: the one measure every phase shares."""
        return self.connections / self.seconds if self.seconds > 0 else 0.0

    @property
    def accounted(self) -> Optional[float]:
        """(delivered + lost) / made: 1.0 when the lost count is exact, below when events vanished uncounted."""
        lost = self.lost if self.lost_accounted is None else self.lost_accounted
        if self.delivered is None or lost is None or not self.expected:
            return None
        return (self.delivered + lost) / self.expected

    @property
    def label(self) -> str:
        """The row name: kind, offered rate when paced, round."""
        rate = f" @{self.target_rate:.0f}/s" if self.target_rate else ""
        return f"{self.kind}{rate} #{self.round + 1}{' !' if self.other_tracers else ''}"


@dataclass
class ReportSpeed:
    """How fast `report --json` read a recording; records are lines, whatever their type."""

    records: int
    seconds: float
    file_mb: float
    peak_rss_mb: float
    connections: Optional[int]
    ok: bool

    @property
    def records_per_s(self) -> float:
        """The issue's unit for report speed."""
        return self.records / self.seconds if self.seconds > 0 else 0.0


class Bench:
    """Runs the phases.  Holds the options, the scratch directory and the children to stop."""

    def __init__(self, args: argparse.Namespace, children: Children, workdir: Path) -> None:
        self.args = args
        self.children = children
        self.workdir = workdir
        self.churn = workdir / "churn"
        self.tracer_cmd = tracer_command(args.tracer)
        self.tcpstates = None if args.no_tcpstates else find_tcpstates()
        self.report_source: Optional[Path] = None  # the recording `report` is timed on

    def build(self) -> None:
        """Compile churn.c for this machine (gcc is the only build dependency)."""
        cc = shutil.which("gcc") or shutil.which("cc")
        if cc is None:
            raise BenchError("gcc (or cc) is needed to build bench/churn.c: apt-get install gcc")
        cmd = [cc, "-O2", "-Wall", "-pthread", "-o", str(self.churn), str(HERE / "churn.c")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise BenchError(f"building churn failed:\n{done.stderr}")

    def load(self, seconds: float, rate: Optional[float] = None,
             at_end: Optional[Callable[[], None]] = None) -> tuple[dict[str, Any], tuple[int, int, int]]:
        """Run churn for `seconds`; returns its result line and the machine's CPU jiffies spent meanwhile.

        `at_end` runs the moment the load has ended, so a tracer's CPU is read over the load window only.
        """
        argv = [str(self.churn), "-d", f"{seconds:g}", "-w", str(self.args.clients), "-a", self.args.address]
        if self.args.servers:
            argv += ["-s", str(self.args.servers)]
        if rate:
            argv += ["-r", f"{rate:g}"]
        before = machine_cpu()
        proc = self.children.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            raise BenchError("churn did not end within its duration + 30 s") from None
        finally:
            self.children.stop(proc, timeout=5)
        if at_end is not None:
            at_end()
        after = machine_cpu()
        lines = out.decode().strip().splitlines()
        if proc.returncode != 0 or not lines:
            raise BenchError(f"churn failed (exit {proc.returncode}): {err.decode().strip()}")
        result = json.loads(lines[-1])
        if result["errors"]:
            print(f"  churn: {result['errors']} failed connections: {err.decode().strip()[:300]}", file=sys.stderr)
        spent = (after[0] - before[0], after[1] - before[1], after[2] - before[2])
        return result, spent

    def _phase(self, kind: str, rnd: int, rate: Optional[float], result: dict[str, Any],
               spent: tuple[int, int, int]) -> Phase:
        """A Phase from churn's result line and the machine's CPU jiffies (total, idle, steal) meanwhile."""
        total = max(1, spent[0])
        return Phase(kind=kind, round=rnd, target_rate=rate, connections=result["connections"],
                     seconds=result["seconds"], errors=result["errors"], port=result["port"],
                     machine_busy_pct=100 * (total - spent[1]) / total, steal_pct=100 * spent[2] / total)

    def untraced(self, rnd: int) -> Phase:
        """The load alone: the reference every ratio is taken against."""
        result, spent = self.load(self.args.seconds)
        return self._phase(UNTRACED, rnd, None, result, spent)

    def traced(self, rnd: int, rate: Optional[float] = None) -> Phase:
        """`tcptrace-bpf record` to a file while the load runs; ready time, CPU, RSS and the footer."""
        path = self.workdir / f"record-{rnd}{'-' + str(int(rate)) if rate else ''}.jsonl"
        argv = self.tracer_cmd + ["record", "--output", str(path)]
        phase, footer = self._jsonl_phase(TCPTRACE, "tcptrace-bpf record", argv, path, rnd, rate, stop_timeout=120)
        phase.lost = int(footer["lost_events"])
        # State changes come a fixed number per connection, and the footer counts their losses apart
        # (lost_by_kind): delivered + lost must be exactly what the load made.  Timewait timer events (re-arms,
        # expiries of earlier phases) vary, and an owner report lost to a skipped run of the filtering I/O hook
        # is only known as a skipped run, so those kinds are left out of this check.
        kinds = footer.get("events_by_kind") or {}
        if "lost_by_kind" in footer:
            phase.delivered = int(kinds.get("state", 0))
            phase.lost_accounted = int(footer["lost_by_kind"].get("state", 0))
            phase.expected = TRANSITIONS_PER_CONNECTION * phase.connections
        else:  # a tracer from before lost_by_kind: state changes and owner reports, against every loss
            phase.delivered = int(kinds.get("state", 0) + kinds.get("owner", 0))
            phase.expected = EVENTS_PER_CONNECTION * phase.connections
        phase.tracer_cpu_total_s = footer.get("cpu_seconds")
        phase.output_mb = path.stat().st_size / 2**20
        self._keep_for_report(path, paced=bool(rate))
        return phase

    def hooks_only(self, rnd: int) -> Phase:
        """tcptrace-bpf's BPF programs with a reader that does nothing (hooks_only.py): the floor any
        frontend could reach on this machine and kernel; the gap to the tcptrace-bpf phase is the frontend's."""
        path = self.workdir / f"hooks-{rnd}.jsonl"
        argv = [sys.executable, str(HERE / "hooks_only.py"), "--output", str(path)]
        phase, footer = self._jsonl_phase(HOOKS, "hooks_only.py", argv, path, rnd, None, stop_timeout=30,
                                          first=b'{"type": "ready"')
        phase.lost = sum(footer["lost_by_kind"].values()) + int(footer["skipped_runs"])
        phase.delivered = int(footer["state"])
        phase.lost_accounted = int(footer["lost_by_kind"].get("state", 0))
        phase.expected = TRANSITIONS_PER_CONNECTION * phase.connections
        if not self.args.keep:
            path.unlink()
        return phase

    def _jsonl_phase(self, kind: str, what: str, argv: list[str], path: Path, rnd: int, rate: Optional[float],
                     stop_timeout: float, first: bytes = b'{"type": "header"') -> tuple[Phase, dict[str, Any]]:
        """Run a tracer (`what`: record, hooks_only.py) that writes JSON Lines to `path` beside the load: ready
        when its first line begins with `first`, stopped with SIGINT; the phase and its footer line."""
        errpath = path.with_suffix(".stderr")
        with open(errpath, "wb") as err:
            started = time.monotonic()
            proc = self.children.start(argv, signal.SIGINT, stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
        try:
            ready = wait_for_header(proc, path, started, timeout=60, errpath=errpath, first=first, what=what)
            phase = self._watch(proc, kind, rnd, rate, stop_timeout=stop_timeout)
        except BaseException:
            self.children.stop(proc, timeout=10)
            raise
        phase.ready_s = ready
        footer = json.loads(last_line(path) or "{}")
        if footer.get("type") != "footer":
            raise BenchError(f"{what}: {path} has no footer (exit {proc.returncode}): {errpath.read_text()[-500:]}")
        errpath.unlink()
        return phase, footer

    def tcpstates_phase(self, rnd: int) -> Phase:
        """bcc's tcpstates with its output sent to a file, as in the earlier measurement of issue 6."""
        assert self.tcpstates is not None
        path = self.workdir / f"tcpstates-{rnd}.txt"
        errpath = path.with_suffix(".stderr")
        with open(path, "wb") as out, open(errpath, "wb") as err:
            started = time.monotonic()
            proc = self.children.start([self.tcpstates], signal.SIGINT, stdout=out, stderr=err)
        try:
            ready = wait_for_output(proc, path, started, timeout=60, address=self.args.address)
            phase = self._watch(proc, TCPSTATES, rnd, None, stop_timeout=30)
        except BaseException:
            self.children.stop(proc, timeout=10)
            raise
        phase.ready_s = ready
        stderr = errpath.read_text(errors="replace")
        reported = sum(int(line.split()[2]) for line in stderr.splitlines() if line.startswith("Possibly lost "))
        phase.lost = reported + (phase.kernel_skipped or 0)
        phase.delivered = count_tcpstates_lines(path, phase.port)
        phase.expected = TRANSITIONS_PER_CONNECTION * phase.connections
        phase.output_mb = path.stat().st_size / 2**20
        if not self.args.keep:
            path.unlink()
            errpath.unlink()
        return phase

    def _watch(self, proc: subprocess.Popen[bytes], kind: str, rnd: int, rate: Optional[float],
               stop_timeout: float) -> Phase:
        """Run the load beside a ready tracer: its CPU over the load window, RSS at the end, then stop it.

        `record` may need a while to stop when it is behind (it drains the ring buffer and writes every
        open socket), so it gets `stop_timeout` seconds before SIGKILL.
        """
        cpu0 = proc_cpu_seconds(proc.pid)
        t0 = time.monotonic()
        seen: dict[str, float] = {}

        def load_ended() -> None:
            seen["cpu"] = proc_cpu_seconds(proc.pid)
            seen["wall"] = time.monotonic() - t0
            seen["rss"], seen["hwm"] = proc_memory_mb(proc.pid)
            seen["skipped"] = bpf_recursion_misses(proc.pid)

        seconds = self.args.rate_seconds if rate else self.args.seconds
        result, spent = self.load(seconds, rate, at_end=load_ended)
        if proc.poll() is not None:
            raise BenchError(f"{kind} exited during the load (exit {proc.returncode})")
        drain_s = wait_idle(proc.pid, limit=30)
        usage = self.children.stop(proc, timeout=stop_timeout)
        phase = self._phase(kind, rnd, rate, result, spent)
        phase.tracer_cpu_pct = 100 * (seen["cpu"] - cpu0) / seen["wall"]
        phase.rss_mb = seen["rss"]
        phase.drain_s = drain_s
        phase.kernel_skipped = int(seen["skipped"])
        # Peak: the larger of VmHWM at the end of the load and wait4's ru_maxrss (which also covers the stop).
        phase.peak_rss_mb = max(seen["hwm"], usage.ru_maxrss / 1024 if usage else 0.0)
        return phase

    def _keep_for_report(self, path: Path, paced: bool) -> None:
        """Keep one recording (the newest at maximum churn) for timing `report`; delete the rest."""
        if paced:  # smaller, not the one to time
            if not self.args.keep:
                path.unlink()
            return
        if self.report_source is not None and not self.args.keep:
            self.report_source.unlink(missing_ok=True)
        self.report_source = path

    def report_speed(self) -> Optional[ReportSpeed]:
        """Time `tcptrace-bpf report FILE --json` on a recording: records (lines) per second."""
        path = self.report_source
        if path is None:
            return None
        records = count_lines(path)
        outpath = self.workdir / "report.json"
        errpath = self.workdir / "report.stderr"
        with open(outpath, "wb") as out, open(errpath, "wb") as err:
            started = time.monotonic()
            proc = self.children.start(self.tracer_cmd + ["report", str(path), "--json"],
                                       stdout=out, stderr=err, cwd=REPO)
            usage = self.children.wait(proc, timeout=1800)
            elapsed = time.monotonic() - started
        if usage is None:
            raise BenchError("report did not finish within 30 minutes")  # stop_all() ends it
        if proc.returncode != 0:
            print(f"  report failed: {errpath.read_text(errors='replace').strip()[-500:]}", file=sys.stderr)
        connections = None
        try:
            connections = json.loads(outpath.read_text()).get("connections")
        except ValueError:
            pass
        return ReportSpeed(records=records, seconds=elapsed, file_mb=path.stat().st_size / 2**20,
                           peak_rss_mb=usage.ru_maxrss / 1024, connections=connections, ok=proc.returncode == 0)


def tracer_command(given: Optional[str]) -> list[str]:
    """The tcptrace-bpf command: --tracer, else the checkout's .venv, else this interpreter's module."""
    if given:
        return given.split()
    venv = REPO / ".venv" / "bin" / "tcptrace-bpf"
    if venv.exists():
        return [str(venv)]
    return [sys.executable, "-m", "tcptrace_bpf"]


def find_tcpstates() -> Optional[str]:
    """bcc's tcpstates: Debian's bpfcc-tools name, upstream's name, or bcc's tools directory."""
    for name in ("tcpstates-bpfcc", "tcpstates"):
        found = shutil.which(name) or next(
            (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/share/bcc/tools") / name) if p.exists()), None)
        if found:
            return found
    return None


def wait_for_header(proc: subprocess.Popen[bytes], path: Path, started: float, timeout: float,
                    errpath: Path, first: bytes, what: str) -> float:
    """Seconds from launch until `record` has written its header line (every probe attached), or
    hooks_only.py its ready line (`first`: how that line begins, `what`: who writes it)."""
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as fh:
                line = fh.readline()
            if line.endswith(b"\n") and line.startswith(first):
                return time.monotonic() - started
        except FileNotFoundError:
            pass
        if proc.poll() is not None:
            raise BenchError(f"{what} exited (status {proc.returncode}) before it was ready: "
                             f"{errpath.read_text(errors='replace').strip()[-500:]}")
        time.sleep(0.005)
    raise BenchError(f"{what} wrote no first line within {timeout:.0f} s")


def wait_for_output(proc: subprocess.Popen[bytes], path: Path, started: float, timeout: float,
                    address: str) -> float:
    """tcpstates' readiness: make a probe connection every 10 ms until its (block-buffered) output appears.

    Returns seconds from launch.  The probes use their own port, so they are not counted as the load's.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.close()

    try:
        listener.bind((address, 0))
        listener.listen(128)
        listener.settimeout(0.2)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = listener.getsockname()[1]
        deadline = started + timeout
        while time.monotonic() < deadline:
            if path.stat().st_size > 0:
                return time.monotonic() - started
            if proc.poll() is not None:
                raise BenchError(f"tcpstates exited (status {proc.returncode}) before it was ready")
            with socket.create_connection((address, port), timeout=1):
                pass
            time.sleep(0.01)
        raise BenchError(f"tcpstates wrote nothing within {timeout:.0f} s")
    finally:
        stop.set()
        listener.close()


# --- output --------------------------------------------------------------------------------------------------


def mean(values: list[float]) -> float:
    """Arithmetic mean; NaN for no values (a kind that did not run shows as such, not as 0)."""
    return sum(values) / len(values) if values else float("nan")


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    """A number for the table, "-" where the phase has no such measurement (e.g. CPU of no tracer)."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def lost_text(lost: Optional[int], expected: Optional[int]) -> str:
    """Lost events with their share of what the load made: "1,234 (5.0%)"."""
    if lost is None:
        return "-"
    return f"{lost:,} ({100 * lost / expected:.1f}%)" if expected else f"{lost:,}"


def table(rows: list[list[str]], right: set[int]) -> str:
    """Plain-text columns (first row is the heading): readable in any terminal, CI log or issue comment."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


LEGEND = f"""\
conn/s: connections completed per second by the load (client: connect, send 1 byte, read EOF; server closes).
lost events: the tracer's own count, and its share of what the load made.  For tcpstates: its "Possibly lost"
  samples plus the runs the kernel skipped (recursion_misses), which tcpstates does not report itself.
accounted: (delivered + lost) / what the load made, {TRANSITIONS_PER_CONNECTION} per connection: tcptrace-bpf's state \
changes (its footer
  counts lost ones by kind), tcpstates' lines.  100% = the lost count is exact; under 100% = events went
  missing without being counted; over 100% = more counted lost than went missing.
hooks only: tcptrace-bpf's BPF programs as `record` loads them, the ring buffer emptied every 10 ms with nothing
  decoded or written (bench/hooks_only.py): what the kernel side costs, the best any frontend could do.
tracer CPU: over the load window, 100% = one core.  RSS: at the end of the load (peak over the whole life).
ready: launch until the probes are attached.  busy/steal: the whole machine's CPU during the phase."""


def render(phases: list[Phase], speed: Optional[ReportSpeed], untraced_rate: float) -> str:
    """The results table: one row per phase (so noise shows), then one per kind (the means compared)."""
    head = ["phase", "conn/s", "vs untraced", "lost events", "accounted", "tracer CPU", "RSS MB (peak)",
            "ready s", "busy/steal"]
    rows = [head]
    for p in phases:
        rss = None if p.rss_mb is None else f"{p.rss_mb:.0f} ({fmt(p.peak_rss_mb, '.0f')})"
        rows.append([
            p.label, f"{p.rate:,.0f}", f"{p.rate / untraced_rate:.2f}x" if untraced_rate and not p.target_rate else "-",
            lost_text(p.lost, p.expected), fmt(None if p.accounted is None else 100 * p.accounted, ".2f", "%"),
            fmt(p.tracer_cpu_pct, ".0f", "%"), rss or "-", fmt(p.ready_s, ".2f"),
            f"{p.machine_busy_pct:.0f}%/{p.steal_pct:.0f}%",
        ])
    rows.append([""] * len(head))
    for kind in (UNTRACED, HOOKS, TCPTRACE, TCPSTATES):
        group = [p for p in phases if p.kind == kind and not p.target_rate]
        if not group:
            continue
        rate = mean([p.rate for p in group])
        lost = [p.lost for p in group if p.lost is not None]
        cpu = [p.tracer_cpu_pct for p in group if p.tracer_cpu_pct is not None]
        rss = [p.rss_mb for p in group if p.rss_mb is not None]
        peak = [p.peak_rss_mb for p in group if p.peak_rss_mb is not None]
        ready = [p.ready_s for p in group if p.ready_s is not None]
        acc = [p.accounted for p in group if p.accounted is not None]
        rows.append([
            f"{kind} (mean of {len(group)})", f"{rate:,.0f}", f"{rate / untraced_rate:.2f}x" if untraced_rate else "-",
            lost_text(sum(lost), sum(p.expected or 0 for p in group)) if lost else "-",
            f"{100 * mean(acc):.2f}%" if acc else "-",
            f"{mean(cpu):.0f}%" if cpu else "-",
            f"{max(rss):.0f} ({max(peak):.0f})" if rss and peak else "-", f"{max(ready):.2f}" if ready else "-", "",
        ])
    text = table(rows, right={1, 2, 3, 4, 5, 6, 7, 8})
    text += "\n\n" + LEGEND
    disturbed = sorted({t for p in phases for t in p.other_tracers})
    if disturbed:
        text += (f"\n! another process was tracing during the phase ({', '.join(disturbed)}): its numbers are"
                 " skewed; run again on a quiet machine.")
    if speed is not None:
        text += (f"\n\nreport --json: {speed.records:,} records ({speed.file_mb:,.0f} MB) in {speed.seconds:.1f} s ="
                 f" {speed.records_per_s:,.0f} records/s, peak RSS {speed.peak_rss_mb:.0f} MB"
                 f"{'' if speed.ok else ' (report FAILED)'}")
    return text


def goals(phases: list[Phase], speed: Optional[ReportSpeed], untraced_rate: float) -> str:
    """Issue 6's goals next to what was measured: the answer to "are we there yet", without gating anything."""
    traced = [p for p in phases if p.kind == TCPTRACE and not p.target_rate]
    everything = [p for p in phases if p.kind == TCPTRACE]
    rows = [["issue 6 goal", "measured", "met"]]
    if traced and untraced_rate:
        ratio = mean([p.rate for p in traced]) / untraced_rate
        rows.append([f"max churn: traced >= {GOAL_RATIO:.2f}x untraced", f"{ratio:.2f}x", yes(ratio >= GOAL_RATIO)])
        hooks = [p for p in phases if p.kind == HOOKS]
        if hooks:  # not a goal: the bound on the one above that no frontend can beat
            floor = mean([p.rate for p in hooks]) / untraced_rate
            rows.append(["  (bound: the BPF hooks alone, a reader that does nothing)", f"{floor:.2f}x",
                         "reachable" if floor >= GOAL_RATIO else "out of reach"])
        lost = sum(p.lost or 0 for p in traced)
        rows.append(["max churn: 0 lost events", f"{lost:,}", yes(lost == 0)])
    if everything:
        worst = max(abs(1 - (p.accounted or 0)) for p in everything)
        rows.append(["lost events reported exactly (delivered + lost = made)", f"off by {100 * worst:.3f}%",
                     yes(worst < 0.001)])
        ready = max(p.ready_s or 0 for p in everything)
        rows.append([f"ready <= {GOAL_READY_S:.0f} s after start", f"{ready:.2f} s", yes(ready <= GOAL_READY_S)])
        rss = max(p.rss_mb or 0 for p in everything)
        peak = max(p.peak_rss_mb or 0 for p in everything)
        rows.append([f"frontend RSS <= {GOAL_RSS_MB:.0f} MB", f"{rss:.0f} MB ({peak:.0f} MB peak)",
                     yes(peak <= GOAL_RSS_MB)])
    if speed is not None:
        rows.append([f"report >= {GOAL_REPORT_RPS // 1000}k records/s", f"{speed.records_per_s:,.0f}/s",
                     yes(speed.ok and speed.records_per_s >= GOAL_REPORT_RPS)])
    return table(rows, right=set())


def yes(ok: bool) -> str:
    """A goal's verdict; "NO" in capitals so a missed goal stands out in the log."""
    return "yes" if ok else "NO"


# --- main ------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    """Options; --quick is a smoke run (5 s phases, 1 round) for checking the benchmark itself works."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="load per phase (default 30)")
    ap.add_argument("--rounds", type=int, default=2, help="repeats of untraced/traced/tcpstates (default 2)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 5 s phases, 1 round")
    ap.add_argument("--clients", type=int, default=os.cpu_count() or 2,
                    help="churn client threads (default: one per CPU, which saturates the machine)")
    ap.add_argument("--servers", type=int, default=0, help="churn server threads (default: as many as clients)")
    ap.add_argument("--address", default="127.0.0.1", choices=("127.0.0.1", "::1"), help="loopback address")
    ap.add_argument("--rates", default="",
                    help="also trace paced loads at these total connections/s (e.g. 2000,4000): where it keeps up")
    ap.add_argument("--rate-seconds", type=float, default=0, help="load per paced phase (default: --seconds)")
    ap.add_argument("--no-tcpstates", action="store_true", help="skip bcc's tcpstates even when installed")
    ap.add_argument("--no-hooks-only", action="store_true",
                    help="skip the phase with tcptrace-bpf's hooks and a reader that does nothing")
    ap.add_argument("--tracer", help="tcptrace-bpf command (default: the checkout's .venv/bin/tcptrace-bpf)")
    ap.add_argument("--settle", type=float, default=2.0, help="pause between phases, seconds (default 2)")
    ap.add_argument("--workdir", type=Path, help="scratch directory (default: a new one under /tmp, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the recordings and the scratch directory")
    ap.add_argument("--json", type=Path, help="also write every measurement to this JSON file")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = min(args.seconds, 5.0), 1
    if not args.rate_seconds:
        args.rate_seconds = args.seconds
    if args.seconds <= 0 or args.seconds > 600 or args.rounds < 1 or args.clients < 1:
        ap.error("--seconds must be in (0, 600], --rounds and --clients at least 1")
    try:
        args.rate_list = [float(r) for r in args.rates.split(",") if r.strip()]
    except ValueError:
        ap.error("--rates takes numbers separated by commas")
    return args


def run(args: argparse.Namespace, children: Children, workdir: Path) -> int:
    """Build, warm up, run the phases in mirrored rounds, time report, print the tables."""
    bench = Bench(args, children, workdir)
    bench.build()
    kinds = [UNTRACED] + ([] if args.no_hooks_only else [HOOKS]) + [TCPTRACE] + ([TCPSTATES] if bench.tcpstates else [])
    tcpstates = bench.tcpstates or ("skipped" if args.no_tcpstates else "not installed")
    print(f"tcptrace-bpf churn benchmark: kernel {platform.release()}, {os.cpu_count()} CPUs, "
          f"churn {args.clients} clients/{args.servers or args.clients} servers on {args.address}, "
          f"{args.seconds:g} s phases x {args.rounds} rounds; tcpstates: {tcpstates}", flush=True)
    for tracer in other_tracers():
        print(f"  WARNING: pid {tracer} holds tracing BPF programs: it will skew the phases", flush=True)
    # Warm-up: first-run effects (page cache, the kernel's TIME_WAIT table filling) land on no phase.
    bench.load(min(3.0, args.seconds))
    phases: list[Phase] = []
    runners: dict[str, Callable[[int], Phase]] = {
        UNTRACED: bench.untraced, HOOKS: bench.hooks_only, TCPTRACE: bench.traced, TCPSTATES: bench.tcpstates_phase}
    plan: list[Callable[[], Phase]] = []
    for rnd in range(args.rounds):
        order = kinds if rnd % 2 == 0 else kinds[::-1]  # mirrored: U H T S, S T H U, ... cancels linear drift
        plan += [functools.partial(runners[kind], rnd) for kind in order]
    plan += [functools.partial(bench.traced, 0, rate) for rate in args.rate_list]
    for runner in plan:
        time.sleep(args.settle)
        before = set(other_tracers())
        phase = runner()
        phase.other_tracers = sorted(before | set(other_tracers()))
        phases.append(phase)
        print(f"  {phase.label}: {phase.rate:,.0f} conn/s"
              + (f", lost {phase.lost:,}, tracer CPU {phase.tracer_cpu_pct:.0f}%" if phase.lost is not None else "")
              + (f"  (disturbed: {', '.join(phase.other_tracers)} tracing too)" if phase.other_tracers else ""),
              flush=True)
    print("  timing report ...", flush=True)
    speed = bench.report_speed()
    untraced_rate = mean([p.rate for p in phases if p.kind == UNTRACED])
    print()
    print(render(phases, speed, untraced_rate))
    print()
    print(goals(phases, speed, untraced_rate))
    if args.json:
        data = {"kernel": platform.release(), "cpus": os.cpu_count(), "args": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "untraced_rate": untraced_rate,
                "phases": [{**asdict(p), "rate": p.rate, "accounted": p.accounted} for p in phases],
                "report": None if speed is None else {**asdict(speed), "records_per_s": speed.records_per_s}}
        args.json.write_text(json.dumps(data, indent=2) + "\n")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point: root check, signal handling, and the clean-up every exit path goes through."""
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench/run.py needs root (tracing loads BPF programs): sudo .venv/bin/python bench/run.py",
              file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    # Ctrl-C must unwind through the clean-up even when started from a script that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="tcptrace-bench-")) if own_workdir else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    children = Children()
    try:
        return run(args, children, workdir)
    except (KeyboardInterrupt, Interrupted):
        print("\ninterrupted: stopping what was started", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        # Ignore further Ctrl-C while stopping, so the clean-up itself cannot be cut short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        children.stop_all()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        elif own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            for pattern in ("record-*", "tcpstates-*", "report.*", "churn"):
                for path in workdir.glob(pattern):
                    path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
