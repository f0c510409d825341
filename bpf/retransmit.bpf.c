/* retransmit.bpf.c: every retransmitted segment, from tcp:tcp_retransmit_skb.
 *
 * Since 6.17 the tracepoint also fires for attempts that failed (field `err`): only err == 0 counts.
 * Kernels without the tracepoint (before 4.15, which also lack inet_sock_set_state) use a kprobe on
 * tcp_retransmit_skb that reports only the socket address; the frontend knows its state.
 */
#include "common.h"

#ifdef TT_RETRANSMIT_KPROBE
int kprobe__tcp_retransmit_skb(struct pt_regs *ctx)
{
    struct tt_event *e = tt_reserve(TT_RETRANSMIT);
    if (!e)
        return 0;
    e->skaddr = (__u64)PT_REGS_PARM1(ctx);
    e->err = -1;
    tt_submit(ctx, e);
    return 0;
}
#elif defined(TT_RAW)
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb)  /* (sk, skb[, err]) */
{
#ifdef TT_RETRANSMIT_HAS_ERR
    if ((int)ctx->args[2] != 0)
        return 0;
#endif
    __u64 sk = ctx->args[0];
    struct tt_event *e = tt_reserve(TT_RETRANSMIT);
    if (!e)
        return 0;
    e->skaddr = sk;
    TT_RD(e->oldstate, sk + TT_OFF_SKC_STATE);
    tt_tuple(e, sk, 1);
    tt_submit(ctx, e);
    return 0;
}
#else
TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
#ifdef TT_RETRANSMIT_HAS_ERR
    if (args->err != 0)
        return 0;
#endif
    struct tt_event *e = tt_reserve(TT_RETRANSMIT);
    if (!e)
        return 0;
    e->skaddr = (__u64)args->skaddr;
#ifdef TT_RETRANSMIT_HAS_STATE
    e->oldstate = args->state;
#endif
#ifdef TT_RETRANSMIT_HAS_FAMILY
    e->family = args->family;
#endif
    e->sport = args->sport;
    e->dport = args->dport;
    __builtin_memcpy(e->saddr, args->saddr_v6, 16);
    __builtin_memcpy(e->daddr, args->daddr_v6, 16);
    tt_submit(args, e);
    return 0;
}
#endif
