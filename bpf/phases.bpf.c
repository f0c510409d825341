/* phases.bpf.c: the phases no tracepoint announces, from the kernel functions that do the work.
 *
 * Used where the kernel lets us hook functions: fentry (TT_PHASES_FENTRY) where BPF trampolines work, else
 * kprobes.  It emits exactly what timers.bpf.c emits from the timer tracepoints, so the frontend follows
 * either the same way; the recording header says which served.
 * - __inet_twsk_schedule(tw, timeo, rearm): the timewait socket's timer armed, when the socket is created
 *   (tcp_time_wait) or re-armed (FIN_WAIT2 -> TIME_WAIT, a segment in TIME_WAIT): start, timeo jiffies left.
 * - inet_twsk_deschedule_put(tw): killed before its time (RST, a SYN reopening it, connect() reusing the
 *   4-tuple, SOCK_DESTROY, namespace exit): cancel.
 * - tw_timer_handler(timer): the timer ran: expire.
 * - tcp_write_wakeup(sk, mib) with mib == LINUX_MIB_TCPKEEPALIVE: a keepalive probe goes out (the same
 *   function sends zero-window probes, with another mib).  The caller counts it in icsk_probes_out after
 *   it returns, so this probe is probes_out + 1.
 * These four names have been stable since 4.x.  Struct offsets and the MIB number come from BTF.
 */
#include "common.h"

/* TT_HOOKn: a hook on a function whose first n arguments we read (an fentry program may read no more
 * arguments than the function has; bcc 0.18's KFUNC_PROBE also needs at least one declared). */
#ifdef TT_PHASES_FENTRY
#define TT_HOOK1(fn) KFUNC_PROBE(fn, __u64 arg0)
#define TT_HOOK2(fn) KFUNC_PROBE(fn, __u64 arg0, __u64 arg1)
#define TT_ARG0 arg0
#define TT_ARG1 arg1
#else
#define TT_HOOK1(fn) int kprobe__##fn(struct pt_regs *ctx)
#define TT_HOOK2(fn) int kprobe__##fn(struct pt_regs *ctx)
#define TT_ARG0 ((__u64)PT_REGS_PARM1(ctx))
#define TT_ARG1 ((__u64)PT_REGS_PARM2(ctx))
#endif

TT_HOOK2(__inet_twsk_schedule)
{
    return tt_timewait_event(ctx, TT_ARG0, TT_TIMER_START, (int)TT_ARG1);
}

TT_HOOK1(inet_twsk_deschedule_put)
{
    return tt_timewait_event(ctx, TT_ARG0, TT_TIMER_CANCEL, -1);
}

TT_HOOK1(tw_timer_handler)
{
    return tt_timewait_event(ctx, TT_ARG0 - TT_OFF_TW_TIMER, TT_TIMER_EXPIRE, 0);
}

TT_HOOK2(tcp_write_wakeup)
{
    if ((int)TT_ARG1 != TT_MIB_TCPKEEPALIVE)
        return 0;
    __u64 sk = TT_ARG0;
    struct tt_event *e = tt_reserve(TT_KEEPALIVE);
    if (!e)
        return 0;
    __u8 probes = 0;
    TT_RD(probes, sk + TT_OFF_ICSK_PROBES_OUT);
    e->newstate = TT_KA_PROBE;
    e->skaddr = sk;
    e->oldstate = probes < 255 ? probes + 1 : 255;  /* probes sent and not yet answered, this one included */
    tt_tuple(e, sk, 1);
    tt_submit(ctx, e);
    return 0;
}

#ifdef TT_TW_RESET_HOOK
/* Before 6.10 tcp:tcp_send_reset fires only for full sockets: a RST that a timewait socket sends (data or a
 * SYN it will not take) is seen here, so its end is `reset`, as the tracepoint says on 6.10+. */
static __always_inline int tt_tw_reset(void *ctx, __u64 sk)
{
    __u8 state = 0;
    if (!sk)
        return 0;
    TT_RD(state, sk + TT_OFF_SKC_STATE);
    if (state != TT_TCP_TIME_WAIT)
        return 0;
    struct tt_event *e = tt_reserve(TT_RESET_SENT);
    if (!e)
        return 0;
    e->skaddr = sk;
    e->oldstate = state;
    e->err = -1;
    tt_tuple(e, sk, 0);
    tt_submit(ctx, e);
    return 0;
}

TT_HOOK1(tcp_v4_send_reset)
{
    return tt_tw_reset(ctx, TT_ARG0);
}
#endif

#ifdef TT_TW_RESET6_HOOK
TT_HOOK1(tcp_v6_send_reset)
{
    return tt_tw_reset(ctx, TT_ARG0);
}
#endif
