"""The hook plan: from what the running kernel offers, which hook serves which fact.

make_plan() is pure (facts in, plan out) so every branch is unit-tested with made-up kernels; probe.py
gathers the facts.  Compile-time switches handed to the BPF sources are feature flags and numbers computed
here, never text from the user.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

RINGBUF_PAGES = 4096  # 16 MiB: ~190k events in flight; timewait expiries come in bursts of thousands

TP_STATE = "sock/inet_sock_set_state"
TP_RETRANSMIT = "tcp/tcp_retransmit_skb"
TP_SEND_RESET = "tcp/tcp_send_reset"
TP_RECEIVE_RESET = "tcp/tcp_receive_reset"
TP_SEND_LENGTH = "sock/sock_send_length"
TP_RECV_LENGTH = "sock/sock_recv_length"
TRACEPOINTS = (TP_STATE, TP_RETRANSMIT, TP_SEND_RESET, TP_RECEIVE_RESET, TP_SEND_LENGTH, TP_RECV_LENGTH)

# Struct fields the raw tracepoint programs read, by BTF: define -> (struct, member path).  SOCK_FIELDS serve
# every raw program (a raw tracepoint gives only the socket pointer); TIMER_FIELDS the timer programs.
SOCK_FIELDS = {
    "TT_OFF_SK_PROTOCOL": ("sock", "sk_protocol"),  # a bitfield before 5.6: no BTF offset, classic tracepoints
    "TT_OFF_INET_SPORT": ("inet_sock", "inet_sport"),
    "TT_OFF_SKC_STATE": ("sock_common", "skc_state"),
    "TT_OFF_SKC_FAMILY": ("sock_common", "skc_family"),
    "TT_OFF_SKC_NUM": ("sock_common", "skc_num"),
    "TT_OFF_SKC_DPORT": ("sock_common", "skc_dport"),
    "TT_OFF_SKC_RCV_SADDR": ("sock_common", "skc_rcv_saddr"),
    "TT_OFF_SKC_DADDR": ("sock_common", "skc_daddr"),
    "TT_OFF_SKC_V6_RCV_SADDR": ("sock_common", "skc_v6_rcv_saddr"),
    "TT_OFF_SKC_V6_DADDR": ("sock_common", "skc_v6_daddr"),
}
TIMER_FIELDS = {
    "TT_OFF_TIMER_FUNCTION": ("timer_list", "function"),
    "TT_OFF_TIMER_EXPIRES": ("timer_list", "expires"),
    "TT_OFF_TW_TIMER": ("inet_timewait_sock", "tw_timer"),
    "TT_OFF_TW_SUBSTATE": ("inet_timewait_sock", "tw_substate"),
    "TT_OFF_KA_TIMER": ("sock", "sk_timer"),  # or icsk_keepalive_timer where BTF has it: KEEPALIVE_TIMER
    "TT_OFF_ICSK_PROBES_OUT": ("inet_connection_sock", "icsk_probes_out"),
}
# The keepalive timer: a timer of its own, inet_connection_sock.icsk_keepalive_timer, in kernels that have that
# member (seen in Debian 12's 6.1, a stable backport shared with MPTCP's timeout timer); sk->sk_timer otherwise
# (this machine's 6.18).  A timer running tcp_keepalive_timer was seen at sk + 1176 on that 6.1 = the former.
KEEPALIVE_TIMER = ("inet_connection_sock", "icsk_keepalive_timer")
TIMER_FUNCTIONS = {"TT_TW_HANDLER": "tw_timer_handler", "TT_KA_HANDLER": "tcp_keepalive_timer"}
# The function hooks (phases.bpf.c) need these fields, these kernel functions and one MIB number.
PHASE_FIELDS = ("TT_OFF_TW_TIMER", "TT_OFF_TIMER_EXPIRES", "TT_OFF_TW_SUBSTATE", "TT_OFF_ICSK_PROBES_OUT")
PHASE_FUNCTIONS = ("__inet_twsk_schedule", "inet_twsk_deschedule_put", "tw_timer_handler", "tcp_write_wakeup")
MIB_KEEPALIVE = "LINUX_MIB_TCPKEEPALIVE"
# Before 6.10 no tracepoint shows a RST sent by a timewait socket: these functions do (optional).
RESET_FUNCTIONS = {"TT_TW_RESET_HOOK": "tcp_v4_send_reset", "TT_TW_RESET6_HOOK": "tcp_v6_send_reset"}
# How timewait and keepalive are hooked, best first: BPF trampolines, kprobes, the generic timer tracepoints.
PHASE_MODES = ("fentry", "kprobe", "timer")


@dataclass
class KernelFacts:
    """What the running kernel and this host offer (gathered by probe.probe_kernel)."""

    release: str
    version: tuple[int, int]
    root: bool = True
    bcc_error: Optional[str] = None
    tracefs: Optional[str] = "/sys/kernel/tracing"
    tracepoints: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> field names
    field_types: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> field -> C type
    btf: bool = True
    btf_error: Optional[str] = None
    sk_err_offset: Optional[int] = None
    rst_reasons: dict[int, str] = field(default_factory=dict)
    kprobes: bool = False
    offsets: dict[str, int] = field(default_factory=dict)  # SOCK_FIELDS and TIMER_FIELDS define -> offset (BTF)
    timer_functions: dict[str, int] = field(default_factory=dict)  # TIMER_FUNCTIONS define -> address
    timer_error: Optional[str] = None  # why the timer path is unavailable
    functions: set[str] = field(default_factory=set)  # PHASE_FUNCTIONS and RESET_FUNCTIONS that kallsyms lists
    btf_functions: set[str] = field(default_factory=set)  # PHASE_FUNCTIONS that BTF describes (fentry needs it)
    mib_keepalive: Optional[int] = None  # LINUX_MIB_TCPKEEPALIVE, from BTF
    trampolines: bool = False  # the kernel has BPF trampolines (fentry), x86_64 with BTF
    hz: Optional[int] = None
    headers: Optional[str] = None  # release of the headers at /lib/modules/$(uname -r)/build


@dataclass
class Problem:
    what: str
    fix: str
    fatal: bool


@dataclass
class Plan:
    hooks: dict[str, str]  # fact -> hook that serves it
    sources: list[str]  # bpf/*.bpf.c files to compile
    defines: dict[str, int]  # -D switches (numbers only)
    problems: list[Problem]
    ringbuf: bool
    raw: bool = False  # raw tracepoints, fields at BTF offsets
    hz: Optional[int] = None
    phases: Optional[str] = None  # the PHASE_MODES entry serving timewait and keepalive, None if inferred
    fallback: Optional[Plan] = None  # the plan to load if the kernel refuses this one's phase hooks

    @property
    def timers(self) -> bool:
        """Timewait and keepalive traced exactly (timers.bpf.c or phases.bpf.c): some phase mode serves."""
        return self.phases is not None

    def falling_back(self, why: str) -> Plan:
        """The fallback plan, noting why this one's phase hooks were refused (for doctor and the header)."""
        assert self.fallback is not None
        fallback = self.fallback
        fallback.problems.append(Problem(f"{self.phases} hooks refused by the kernel: {why}",
                                         f"timewait and keepalive use {fallback.phases or 'inference'} instead",
                                         False))
        fallback.hooks["refused"] = f"{self.phases}: {why}"
        return fallback

    @property
    def fatal(self) -> bool:
        return any(p.fatal for p in self.problems)

    def cflags(self) -> list[str]:
        """-D switches: integers only (kernel addresses get a ULL suffix)."""
        return [f"-D{name}={int(value)}{'ULL' if int(value) >= 2**31 else ''}"
                for name, value in sorted(self.defines.items())]


def phase_modes(facts: KernelFacts) -> list[str]:
    """The ways this kernel could hook timewait and keepalive, best first (loading may still refuse one)."""
    modes = []
    fields = all(name in facts.offsets for name in PHASE_FIELDS) and facts.mib_keepalive is not None
    functions = fields and set(PHASE_FUNCTIONS) <= facts.functions and bool(facts.hz)
    if functions and facts.trampolines and set(PHASE_FUNCTIONS) <= facts.btf_functions:
        modes.append("fentry")
    if functions and facts.kprobes:
        modes.append("kprobe")
    if (all(name in facts.offsets for name in TIMER_FIELDS) and len(facts.timer_functions) == len(TIMER_FUNCTIONS)
            and bool(facts.hz)):
        modes.append("timer")
    return modes


def make_plan(facts: KernelFacts, phases: Optional[str] = None) -> Plan:
    """The plan for this kernel.  `phases` forces one of PHASE_MODES (tests exercise each on kernels that
    have several); by default the best available, with the next ones chained as fallbacks."""
    modes = phase_modes(facts)
    if phases is not None:
        modes = [phases] if phases in modes else []
    plan = _make_plan(facts, modes[0] if modes else None, phases)
    last = plan
    for mode in modes[1:]:
        last.fallback = _make_plan(facts, mode, None)
        last = last.fallback
    return plan


def _make_plan(facts: KernelFacts, mode: Optional[str], forced: Optional[str]) -> Plan:
    hooks: dict[str, str] = {}
    sources: list[str] = []
    defines: dict[str, int] = {}
    problems: list[Problem] = []
    tps = facts.tracepoints

    if not facts.root:
        problems.append(Problem("not running as root", "run as root (sudo)", True))
    if facts.bcc_error:
        problems.append(Problem(f"bcc is not usable: {facts.bcc_error}",
                                "run ./setup.sh (installs Debian's python3-bpfcc; never the PyPI 'bcc')", True))
    if not facts.tracefs:
        problems.append(Problem("tracefs is not mounted", "mount -t tracefs nodev /sys/kernel/tracing", True))
    if facts.headers is None:
        problems.append(Problem(f"no kernel headers at /lib/modules/{facts.release}/build",
                                "run ./setup.sh (installs the distro's headers and links them)", True))
    elif not facts.release.startswith(facts.headers):
        problems.append(Problem(
            f"kernel headers are {facts.headers}, the kernel is {facts.release}",
            "fine for tcptrace-bpf (tracepoint fields come from tracefs, struct offsets from BTF); "
            "install linux-headers-$(uname -r) where the distro has it", False))

    ringbuf = facts.version >= (5, 8)
    if ringbuf:
        defines["TT_RINGBUF"] = 1
        defines["TT_RINGBUF_PAGES"] = RINGBUF_PAGES
        hooks["delivery"] = (f"ring buffer ({RINGBUF_PAGES * 4} KiB); lost = failed reserves per CPU + runs the "
                             "kernel skipped (recursion_misses)")
    else:
        hooks["delivery"] = "perf buffer; lost = lost-sample callback + runs the kernel skipped (recursion_misses)"

    raw = facts.version >= (4, 17) and all(name in facts.offsets for name in SOCK_FIELDS)
    kind = "raw tracepoint" if raw else "tracepoint"
    if raw:
        defines["TT_RAW"] = 1
        defines.update({name: facts.offsets[name] for name in SOCK_FIELDS})
    if TP_STATE in tps:
        sources.append("state.bpf.c")
        hooks["state"] = f"{kind} sock:inet_sock_set_state"
    else:
        problems.append(Problem("tracepoint sock:inet_sock_set_state is missing (kernel older than 4.16?)",
                                "tcptrace-bpf needs Linux 4.16 or newer", True))

    if facts.sk_err_offset is not None:
        defines["TT_SK_ERR_OFFSET"] = facts.sk_err_offset
        hooks["close_error"] = f"sk->sk_err read at ->CLOSE (BTF offset {facts.sk_err_offset})"
    else:
        defines["TT_SK_ERR_OFFSET"] = -1
        hooks["close_error"] = "unavailable: timeouts cannot be told from other closes"
        problems.append(Problem(f"no BTF for struct sock ({facts.btf_error or 'missing'})",
                                "use a kernel built with CONFIG_DEBUG_INFO_BTF=y", False))

    if TP_RETRANSMIT in tps:
        fields = tps[TP_RETRANSMIT]
        sources.append("retransmit.bpf.c")
        for name in ("err", "state", "family"):
            if name in fields:
                defines[f"TT_RETRANSMIT_HAS_{name.upper()}"] = 1
        hooks["retransmit"] = f"{kind} tcp:tcp_retransmit_skb" + (" (err == 0 only)" if "err" in fields else "")
    elif facts.kprobes:
        sources.append("retransmit.bpf.c")
        defines["TT_RETRANSMIT_KPROBE"] = 1
        hooks["retransmit"] = "kprobe tcp_retransmit_skb"
    else:
        hooks["retransmit"] = "unavailable"
        problems.append(Problem("no tcp:tcp_retransmit_skb tracepoint and no kprobes",
                                "retransmits will not be counted", False))

    if TP_SEND_RESET in tps and TP_RECEIVE_RESET in tps:
        sources.append("reset.bpf.c")
        send = tps[TP_SEND_RESET]
        types = facts.field_types.get(TP_SEND_RESET, {})
        if "reason" in send:
            defines["TT_SEND_RESET_HAS_REASON"] = 1
            # bcc's args struct names the enum; nothing we include defines it, even where the matching
            # headers have include/net/rstreason.h (seen on Debian 13's 6.12): declare it ourselves.
            if "enum sk_rst_reason" in types.get("reason", ""):
                defines["TT_DECLARE_SK_RST_REASON"] = 1
        if "state" in send:
            defines["TT_SEND_RESET_HAS_STATE"] = 1
        if "sport" not in send:
            defines["TT_SEND_RESET_SOCKADDR"] = 1
        elif "family" in send:
            defines["TT_SEND_RESET_HAS_FAMILY"] = 1
        if "family" in tps[TP_RECEIVE_RESET]:
            defines["TT_RECEIVE_RESET_HAS_FAMILY"] = 1
        hooks["reset_sent"] = "tracepoint tcp:tcp_send_reset"
        hooks["reset_received"] = f"{kind} tcp:tcp_receive_reset"
    else:
        hooks["reset_sent"] = hooks["reset_received"] = "unavailable"
        problems.append(Problem("tcp:tcp_send_reset/tcp_receive_reset missing", "resets will not be seen", False))

    if TP_SEND_LENGTH in tps and TP_RECV_LENGTH in tps:
        sources.append("owner.bpf.c")
        defines["TT_OWNER_TRACKING"] = 1
        hooks["owner"] = (f"connect/listen/close transitions, and {kind} sock:sock_send_length/sock_recv_length "
                          "(first I/O per task)")
    else:
        hooks["owner"] = "connect/listen/close transitions; accepted sockets take their listener's owner"

    timers = raw and mode is not None
    if timers and mode == "timer":
        sources.append("timers.bpf.c")
        defines.update({name: facts.offsets[name] for name in TIMER_FIELDS})
        defines.update(facts.timer_functions)
        hooks["time_wait"] = ("exact: raw tracepoints timer:timer_start/timer_cancel/timer_expire_entry on "
                              "tw_timer_handler (creation, FIN_WAIT2 -> TIME_WAIT, expiry, early kill)")
        hooks["fin_wait2"] = "exact: the timewait socket's substate and timer (orphaned sockets included)"
        hooks["keepalive"] = ("exact: raw tracepoints timer:timer_expire_entry/exit on tcp_keepalive_timer "
                              "(icsk_probes_out before and after)")
    elif timers:
        sources.insert(0, "phases.bpf.c")  # first: a refused fentry fails the load before anything attaches
        defines.update({name: facts.offsets[name] for name in PHASE_FIELDS})
        defines["TT_MIB_TCPKEEPALIVE"] = int(facts.mib_keepalive or 0)
        if mode == "fentry":
            defines["TT_PHASES_FENTRY"] = 1
        if hooks["reset_sent"].startswith("tracepoint") and "TT_SEND_RESET_SOCKADDR" not in defines:
            # before 6.10 the tracepoint cannot show a timewait socket's RST
            described = facts.btf_functions if mode == "fentry" else facts.functions
            for define, name in RESET_FUNCTIONS.items():
                if name in facts.functions and name in described:
                    defines[define] = 1
            if "TT_TW_RESET_HOOK" in defines:
                hooks["reset_sent"] += f" + {mode} tcp_v4/v6_send_reset for timewait sockets"
        hooks["time_wait"] = (f"exact: {mode} __inet_twsk_schedule/inet_twsk_deschedule_put/tw_timer_handler "
                              "(creation and re-arm, early kill, expiry)")
        hooks["fin_wait2"] = "exact: the timewait socket's substate and timer (orphaned sockets included)"
        hooks["keepalive"] = f"exact: {mode} tcp_write_wakeup with mib LINUX_MIB_TCPKEEPALIVE"
    else:
        why = facts.timer_error or ("no raw tracepoints with BTF offsets" if not raw else "timer hooks unavailable")
        if forced is not None:
            why = f"{forced} hooks are not available on this kernel"
        hooks["time_wait"] = f"inferred: FIN_WAIT2/CLOSING -> CLOSE with no reset and no error ({why})"
        hooks["keepalive"] = f"not traced ({why})"
        problems.append(Problem(f"timewait and keepalive cannot be traced exactly: {why}",
                                "TIME_WAIT entry is inferred; keepalive probes are not counted", False))
    return Plan(hooks, sources, defines, problems, ringbuf, raw=raw, hz=facts.hz, phases=mode if timers else None)
