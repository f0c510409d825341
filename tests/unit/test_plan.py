"""Hook plans for made-up kernels: each branch of make_plan."""

from __future__ import annotations

import re

from tcptrace_bpf.plan import (
    PHASE_FUNCTIONS,
    SOCK_FIELDS,
    TIMER_FIELDS,
    TP_RECEIVE_RESET,
    TP_RECV_LENGTH,
    TP_RETRANSMIT,
    TP_SEND_LENGTH,
    TP_SEND_RESET,
    TP_STATE,
    KernelFacts,
    make_plan,
    phase_modes,
)

STATE_FIELDS = ("skaddr", "oldstate", "newstate", "sport", "dport", "family", "protocol", "saddr", "daddr",
                "saddr_v6", "daddr_v6")
ADDR = ("sport", "dport", "family", "saddr", "daddr", "saddr_v6", "daddr_v6")


def kernel_6_18(**changes):
    facts = KernelFacts(
        release="6.18.44", version=(6, 18), headers="6.18.44", sk_err_offset=284,
        tracepoints={
            TP_STATE: STATE_FIELDS,
            TP_RETRANSMIT: ("skbaddr", "skaddr", "state") + ADDR + ("err",),
            TP_SEND_RESET: ("skbaddr", "skaddr", "state", "reason", "saddr", "daddr"),
            TP_RECEIVE_RESET: ("skaddr",) + ADDR + ("sock_cookie",),
            TP_SEND_LENGTH: ("sk", "family", "protocol", "ret", "flags"),
            TP_RECV_LENGTH: ("sk", "family", "protocol", "ret", "flags"),
        },
        field_types={TP_SEND_RESET: {"reason": "enum sk_rst_reason"}},
        offsets={define: 8 * i for i, define in enumerate({**SOCK_FIELDS, **TIMER_FIELDS})},
        timer_functions={"TT_TW_HANDLER": 0xFFFFFFFF82003430, "TT_KA_HANDLER": 0xFFFFFFFF820289B0}, hz=250,
    )
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def kernel_5_10():
    return KernelFacts(
        release="5.10.0-30-amd64", version=(5, 10), headers="5.10.0-30-amd64", sk_err_offset=268, kprobes=True,
        tracepoints={
            TP_STATE: STATE_FIELDS,
            TP_RETRANSMIT: ("skbaddr", "skaddr", "state") + ADDR,
            TP_SEND_RESET: ("skbaddr", "skaddr", "state") + ADDR,
            TP_RECEIVE_RESET: ("skaddr",) + ADDR + ("sock_cookie",),
        },
    )


def test_6_18_uses_every_tracepoint_and_the_ringbuf():
    plan = make_plan(kernel_6_18())
    assert plan.sources == ["state.bpf.c", "retransmit.bpf.c", "reset.bpf.c", "owner.bpf.c", "timers.bpf.c"]
    assert plan.timers and plan.hz == 250 and plan.hooks["time_wait"].startswith("exact")
    assert "-DTT_TW_HANDLER=18446744071595635760ULL" in plan.cflags()
    assert plan.ringbuf and not plan.problems
    d = plan.defines
    assert d["TT_SK_ERR_OFFSET"] == 284 and d["TT_RETRANSMIT_HAS_ERR"] == 1 and d["TT_SEND_RESET_SOCKADDR"] == 1
    assert d["TT_DECLARE_SK_RST_REASON"] == 1 and d["TT_OWNER_TRACKING"] == 1
    assert "(err == 0 only)" in plan.hooks["retransmit"]
    assert all(re.fullmatch(r"-DTT_\w+=-?\d+(ULL)?", flag) for flag in plan.cflags())


def test_the_reset_reason_enum_is_declared_whenever_the_tracepoint_uses_it():
    # nothing our programs include defines it, even with the kernel's own headers (Debian 13's 6.12)
    assert make_plan(kernel_6_18()).defines["TT_DECLARE_SK_RST_REASON"] == 1
    assert "TT_DECLARE_SK_RST_REASON" not in make_plan(kernel_5_10()).defines


def test_5_10_has_plain_reset_fields_and_no_owner_io():
    plan = make_plan(kernel_5_10())
    assert "owner.bpf.c" not in plan.sources and "TT_OWNER_TRACKING" not in plan.defines
    assert "TT_SEND_RESET_SOCKADDR" not in plan.defines and plan.defines["TT_SEND_RESET_HAS_FAMILY"] == 1
    assert "TT_RETRANSMIT_HAS_ERR" not in plan.defines
    assert "listener's owner" in plan.hooks["owner"]


def test_old_kernel_uses_perf_buffer():
    facts = kernel_5_10()
    facts.version = (5, 4)
    plan = make_plan(facts)
    assert not plan.ringbuf and "TT_RINGBUF" not in plan.defines
    assert plan.hooks["delivery"].startswith("perf buffer")


def test_kprobe_fallback_for_retransmit():
    facts = kernel_5_10()
    del facts.tracepoints[TP_RETRANSMIT]
    plan = make_plan(facts)
    assert plan.defines["TT_RETRANSMIT_KPROBE"] == 1 and plan.hooks["retransmit"] == "kprobe tcp_retransmit_skb"
    facts.kprobes = False
    plan = make_plan(facts)
    assert plan.hooks["retransmit"] == "unavailable" and not plan.fatal and plan.problems


def test_fatal_problems():
    plan = make_plan(kernel_6_18(root=False, bcc_error="cannot import bcc", tracefs=None, headers=None))
    assert plan.fatal
    whats = " ".join(p.what for p in plan.problems)
    assert "root" in whats and "bcc" in whats and "tracefs" in whats and "headers" in whats


def test_no_inet_sock_set_state_is_fatal():
    facts = kernel_6_18()
    del facts.tracepoints[TP_STATE]
    assert make_plan(facts).fatal


def test_mismatched_headers_warn_only():
    plan = make_plan(kernel_6_18(headers="6.1.192"))
    assert not plan.fatal and "6.1.192" in plan.problems[0].what


def test_no_btf_warns_and_disables_error_read():
    plan = make_plan(kernel_6_18(sk_err_offset=None, btf=False, btf_error="missing"))
    assert plan.defines["TT_SK_ERR_OFFSET"] == -1 and not plan.fatal
    assert "unavailable" in plan.hooks["close_error"]


def test_no_timer_path_falls_back_to_inference():
    plan = make_plan(kernel_6_18(timer_functions={}, timer_error="timer handler addresses not readable"))
    assert not plan.timers and "timers.bpf.c" not in plan.sources and not plan.fatal
    assert plan.hooks["time_wait"].startswith("inferred") and "not readable" in plan.hooks["keepalive"]


def test_raw_tracepoints_where_btf_gives_the_socket_fields():
    plan = make_plan(kernel_6_18())
    assert plan.raw and plan.defines["TT_RAW"] == 1 and plan.hooks["state"] == "raw tracepoint sock:inet_sock_set_state"
    old = kernel_6_18(offsets={})  # e.g. sk_protocol a bitfield (before 5.6): classic tracepoints, no timers
    plan = make_plan(old)
    assert not plan.raw and not plan.timers and plan.hooks["state"] == "tracepoint sock:inet_sock_set_state"


def kernel_6_1_stock(**changes):
    """A distro kernel: kprobes, BPF trampolines, and the timewait/keepalive functions in kallsyms and BTF."""
    facts = kernel_6_18(release="6.1.0-40-amd64", version=(6, 1), headers="6.1.0-40-amd64", kprobes=True,
                        trampolines=True, functions=set(PHASE_FUNCTIONS), btf_functions=set(PHASE_FUNCTIONS),
                        mib_keepalive=114)
    for key, value in changes.items():
        setattr(facts, key, value)
    return facts


def test_phase_hooks_best_first_with_the_rest_as_fallbacks():
    facts = kernel_6_1_stock()
    assert phase_modes(facts) == ["fentry", "kprobe", "timer"]
    plan = make_plan(facts)
    chain = [plan.phases, plan.fallback.phases, plan.fallback.fallback.phases]
    assert chain == ["fentry", "kprobe", "timer"] and plan.fallback.fallback.fallback is None
    assert plan.sources[0] == "phases.bpf.c" and "timers.bpf.c" not in plan.sources
    assert "-DTT_PHASES_FENTRY=1" in plan.cflags() and "-DTT_MIB_TCPKEEPALIVE=114" in plan.cflags()
    assert "TT_PHASES_FENTRY" not in plan.fallback.defines and plan.fallback.sources[0] == "phases.bpf.c"
    assert plan.hooks["keepalive"] == "exact: fentry tcp_write_wakeup with mib LINUX_MIB_TCPKEEPALIVE"
    assert plan.fallback.fallback.sources[-1] == "timers.bpf.c" and "TT_TW_HANDLER" in plan.fallback.fallback.defines
    assert all(p.timers for p in (plan, plan.fallback, plan.fallback.fallback))


def test_a_refused_mode_is_named_in_the_plan_that_replaces_it():
    plan = make_plan(kernel_6_1_stock())
    fallback = plan.falling_back("the kernel refused the program (EPERM)")
    assert fallback.phases == "kprobe" and fallback.hooks["refused"] == "fentry: the kernel refused the program (EPERM)"
    assert any("fentry hooks refused" in p.what and not p.fatal for p in fallback.problems)


def test_each_mode_needs_its_own_facts():
    assert phase_modes(kernel_6_1_stock(btf_functions=set())) == ["kprobe", "timer"]  # fentry needs BTF FUNCs
    assert phase_modes(kernel_6_1_stock(trampolines=False, kprobes=False)) == ["timer"]
    assert phase_modes(kernel_6_1_stock(functions={"tw_timer_handler"})) == ["timer"]  # e.g. a function inlined
    assert phase_modes(kernel_6_1_stock(mib_keepalive=None)) == ["timer"]
    assert phase_modes(kernel_6_18()) == ["timer"]  # this machine's kernel: no kprobes, no trampolines in facts
    assert phase_modes(kernel_6_18(timer_functions={})) == []


def test_a_forced_mode_has_no_fallback_and_an_unavailable_one_is_inferred():
    plan = make_plan(kernel_6_1_stock(), phases="kprobe")
    assert plan.phases == "kprobe" and plan.fallback is None
    plan = make_plan(kernel_6_18(), phases="fentry")
    assert plan.phases is None and not plan.timers and "fentry hooks are not available" in plan.hooks["keepalive"]


def test_a_timewait_sockets_rst_is_hooked_where_the_tracepoint_cannot_show_it():
    functions = set(PHASE_FUNCTIONS) | {"tcp_v4_send_reset", "tcp_v6_send_reset"}
    old_reset = {**kernel_6_18().tracepoints, TP_SEND_RESET: ("skbaddr", "skaddr", "state") + ADDR}
    plan = make_plan(kernel_6_1_stock(tracepoints=old_reset, functions=functions, btf_functions=functions))
    assert plan.defines["TT_TW_RESET_HOOK"] == 1 and plan.defines["TT_TW_RESET6_HOOK"] == 1
    assert plan.hooks["reset_sent"].endswith("+ fentry tcp_v4/v6_send_reset for timewait sockets")
    assert plan.fallback.fallback.phases == "timer" and "TT_TW_RESET_HOOK" not in plan.fallback.fallback.defines
    # 6.10+: tcp:tcp_send_reset fires for timewait sockets itself
    assert "TT_TW_RESET_HOOK" not in make_plan(kernel_6_1_stock(functions=functions, btf_functions=functions)).defines
