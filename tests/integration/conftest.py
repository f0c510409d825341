"""Integration fixtures: the real tracer (kernel source, engine) running in a thread for the whole session.

A missing capability (not root, no bcc, no tracefs) fails the run in CI and skips it elsewhere.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Optional

import pytest

from tcptrace_bpf.engine import Lifecycle
from tcptrace_bpf.events import Event
from tcptrace_bpf.filters import NO_FILTER
from tcptrace_bpf.kernel import KernelSource, SourceError
from tcptrace_bpf.plan import Plan, make_plan, phase_modes
from tcptrace_bpf.probe import probe_kernel
from tcptrace_bpf.tracer import Tracer, engine_for, header

from .net import NetnsPair


def missing_capability() -> Optional[str]:
    if os.geteuid() != 0:
        return "not root"
    facts = probe_kernel()
    plan = make_plan(facts)
    fatal = [p.what for p in plan.problems if p.fatal]
    return "; ".join(fatal) or None


@pytest.fixture(scope="session", autouse=True)
def capabilities() -> None:
    problem = missing_capability()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"integration tests cannot run: {problem}")
        pytest.skip(f"integration tests need root, bcc and tracefs: {problem}")


class Collector:
    """Sink keeping every event and every finished lifecycle, for tests to wait on."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[Event] = []
        self.done: list[Lifecycle] = []
        self.closed_list: list[Lifecycle] = []
        self.footer: Optional[dict[str, Any]] = None

    def start(self, header: dict[str, Any]) -> None:
        pass

    def event(self, ev: Event, lc: Optional[Lifecycle]) -> None:
        with self.lock:
            self.events.append(ev)

    def finished(self, lc: Lifecycle) -> None:
        with self.lock:
            self.done.append(lc)

    def closed(self, lc: Lifecycle) -> None:
        with self.lock:
            self.closed_list.append(lc)

    def tick(self, now: float) -> None:
        pass

    def close(self, footer: dict[str, Any]) -> None:
        self.footer = footer


def every_plan(plan: Plan, change: Callable[[Plan], Any]) -> Plan:
    """Apply `change` to the plan and to each fallback it chains (the one that loads may be any of them)."""
    link: Optional[Plan] = plan
    while link is not None:
        change(link)
        link = link.fallback
    return plan


class LiveTrace:
    def __init__(self, phases: Optional[str] = None, ring_pages: Optional[int] = None) -> None:
        plan = make_plan(probe_kernel(), phases=phases)
        if ring_pages is not None:
            every_plan(plan, lambda link: link.defines.update(TT_RINGBUF_PAGES=ring_pages))
        self.source = KernelSource(plan)
        self.collector = Collector()
        self.tracer = Tracer(self.source, [self.collector], engine_for(self.plan))
        self.ready = threading.Event()
        self.error: Optional[BaseException] = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.tracer.run(header(self.plan, NO_FILTER),
                            on_ready=self.ready.set)
        except BaseException as exc:  # surfaced to the tests by wait_for
            self.error = exc
            self.ready.set()

    @property
    def plan(self) -> Plan:
        """The plan that loaded (the kernel may have refused the first choice's phase hooks)."""
        return self.source.plan

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(30), "tracer did not become ready"
        assert self.error is None, self.error

    def stop(self) -> None:
        self.tracer.stop("test session over")
        self.thread.join(10)

    def wait_for(self, match: Callable[[Lifecycle], bool], count: int = 1, timeout: float = 10,
                 closed: bool = False) -> list[Lifecycle]:
        """Finished (or, with closed=True, closed: a timewait socket may live on) lifecycles matching
        `match`, once at least `count` exist (fails after `timeout`)."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.error is None, self.error
            with self.collector.lock:
                found = [lc for lc in (self.collector.closed_list if closed else self.collector.done) if match(lc)]
            if len(found) >= count or time.monotonic() > deadline:
                if len(found) < count:  # say what the tracer does hold, to tell a miss from a mismatch
                    with self.collector.lock:
                        held = [(lc.role, lc.laddr, lc.lport, lc.raddr, lc.rport, lc.state, lc.end, lc.tw_state)
                                for lc in self.tracer.engine.lifecycles()][-8:]
                    raise AssertionError(f"expected {count} lifecycles, found {len(found)}; lost events "
                                         f"{self.lost()}; last held: {held}")
                return found
            time.sleep(0.05)

    def events_for(self, match: Callable[[Event], bool]) -> list[Event]:
        with self.collector.lock:
            return [ev for ev in self.collector.events if match(ev)]

    def lost(self) -> int:
        return self.source.lost()


def wait_for_quiet_host(limit: int = 2000, timeout: float = 75) -> int:
    """TIME_WAIT sockets left by an earlier load (a benchmark) expire in bursts of thousands within a minute;
    their timer events can fill the ring buffer.  The tracer counts such losses, but a test's own lifecycle
    could be among them: let that minute pass first.  Returns how many were left."""
    from tcptrace_bpf import sockdiag

    deadline = time.monotonic() + timeout
    while True:
        left = len(sockdiag.dump(states=(1 << 6) | (1 << 5)))
        if left <= limit or time.monotonic() > deadline:
            return left
        time.sleep(1)


_TESTED_PHASES: Optional[list[str]] = None


def tested_phase_modes() -> list[str]:
    """The timewait/keepalive hook modes to run the phase tests under: every one this kernel offers and
    accepts.  TCPTRACE_EXPECT_PHASES (the VM runner sets it) names them instead, so a mode the kernel should
    take but refuses fails the run rather than vanishing from it.  Otherwise only a refusal with EPERM (a
    kernel policy, as fentry here) drops a mode; any other load failure keeps it, to fail in its tests."""
    global _TESTED_PHASES
    if _TESTED_PHASES is None:
        expected = os.environ.get("TCPTRACE_EXPECT_PHASES")
        if expected:
            _TESTED_PHASES = [mode.strip() for mode in expected.split(",") if mode.strip()]
        else:
            facts = probe_kernel()
            _TESTED_PHASES = []
            for mode in phase_modes(facts):
                source = KernelSource(make_plan(facts, phases=mode))
                try:
                    source.start()
                except SourceError as exc:
                    if "EPERM" in exc.why:
                        continue
                finally:
                    source.close()
                _TESTED_PHASES.append(mode)
    return _TESTED_PHASES


def pytest_generate_tests(metafunc: Any) -> None:
    if "phases" in metafunc.fixturenames:
        modes = tested_phase_modes() if os.geteuid() == 0 else ["timer"]
        metafunc.parametrize("phases", modes, scope="module")


@pytest.fixture(scope="module")
def traced(phases: str, live: Any) -> Any:
    """A tracer whose timewait and keepalive hooks are `phases`: the session's own when it uses that mode."""
    if live.plan.phases == phases:
        yield live
        return
    trace = LiveTrace(phases)
    trace.start()
    assert trace.plan.phases == phases, trace.plan.hooks
    yield trace
    trace.stop()


@pytest.fixture(scope="session")
def live() -> Any:
    wait_for_quiet_host()
    trace = LiveTrace()
    trace.start()
    yield trace
    trace.stop()


@pytest.fixture(scope="session")
def netns() -> Any:
    pair = NetnsPair(f"tt{os.getpid() % 10000}")
    pair.create()
    yield pair
    pair.destroy()
