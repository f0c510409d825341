/* timers.bpf.c: the phases no tracepoint announces, from the generic timer raw tracepoints.
 *
 * - TIME_WAIT: a socket handed to the kernel's timewait socket lives on in a struct inet_timewait_sock
 *   whose timer runs tw_timer_handler.  timer_start = created (or re-armed: FIN_WAIT2 -> TIME_WAIT),
 *   timer_expire_entry = expired, timer_cancel with nothing after it = killed early.  A re-arm that lands
 *   in the same timer-wheel bucket is silent, but it still updates timer->expires, so every event carries
 *   the jiffies left (err) and the substate (oldstate) and the frontend places the switch exactly.
 * - Keepalive: tcp_keepalive_timer runs on the socket's keepalive timer (sk_timer, or icsk_keepalive_timer
 *   where the kernel has one: TT_OFF_KA_TIMER); a probe was sent when icsk_probes_out grew across the
 *   handler (entry -> exit).
 * Raw tracepoints, not classic ones: classic tracepoint programs share a per-CPU recursion guard and are
 * skipped when a timer softirq interrupts another BPF program (seen here: ~7% of expiries under load).
 * Every struct field is read at its BTF offset (TT_OFF_*); function addresses come from /proc/kallsyms.
 */
#include "common.h"

BPF_PERCPU_ARRAY(ka_entry, __u64, 2);  /* [0] socket in the keepalive handler, [1] its probes_out at entry */

static __always_inline int tt_timewait(void *ctx, __u64 timer, __u8 phase)
{
    __u64 function = 0;
    TT_RD(function, timer + TT_OFF_TIMER_FUNCTION);
    if (function != TT_TW_HANDLER)
        return 0;
    return tt_timewait_event(ctx, timer - TT_OFF_TW_TIMER, phase, -1);
}

RAW_TRACEPOINT_PROBE(timer_start)
{
    return tt_timewait(ctx, ctx->args[0], TT_TIMER_START);
}

RAW_TRACEPOINT_PROBE(timer_cancel)
{
    return tt_timewait(ctx, ctx->args[0], TT_TIMER_CANCEL);
}

RAW_TRACEPOINT_PROBE(timer_expire_entry)
{
    __u64 timer = ctx->args[0], function = 0;
    TT_RD(function, timer + TT_OFF_TIMER_FUNCTION);
    if (function == TT_KA_HANDLER) {
        int zero = 0, one = 1;
        __u64 *slot = ka_entry.lookup(&zero), *before = ka_entry.lookup(&one);
        __u8 probes = 0;
        TT_RD(probes, timer - TT_OFF_KA_TIMER + TT_OFF_ICSK_PROBES_OUT);
        if (slot && before) {
            *slot = timer - TT_OFF_KA_TIMER;
            *before = probes;
        }
        return 0;
    }
    return tt_timewait(ctx, timer, TT_TIMER_EXPIRE);
}

RAW_TRACEPOINT_PROBE(timer_expire_exit)
{
    int zero = 0, one = 1;
    __u64 *slot = ka_entry.lookup(&zero), *before = ka_entry.lookup(&one);
    if (!slot || !before || !*slot || *slot != ctx->args[0] - TT_OFF_KA_TIMER)
        return 0;
    __u64 sk = *slot;
    *slot = 0;
    __u8 probes = 0;
    TT_RD(probes, sk + TT_OFF_ICSK_PROBES_OUT);
    if (probes <= *before)
        return 0;  /* no probe went out: a reschedule, or the socket is not in keepalive */
    struct tt_event *e = tt_reserve(TT_KEEPALIVE);
    if (!e)
        return 0;
    e->newstate = TT_KA_PROBE;
    e->skaddr = sk;
    e->oldstate = probes;  /* probes sent and not yet answered, this one included */
    tt_tuple(e, sk, 1);
    tt_submit(ctx, e);
    return 0;
}
