/* state.bpf.c: every TCP state change, from sock:inet_sock_set_state.
 *
 * Fact served: the transitions themselves.  At ->CLOSE it also reads sk->sk_err (offset from BTF,
 * TT_SK_ERR_OFFSET; -1 when unknown) because the kernel sets it just before tcp_done() on every error path:
 * ETIMEDOUT for a timeout, ECONNREFUSED/ECONNRESET/EPIPE for a reset, 0 for an orderly or abortive close.
 */
#include "common.h"

/* The part both hook flavours share: forget the owner at ->CLOSE, reserve, and read sk_err there.  The
 * caller fills in the 4-tuple (from tracepoint fields or BTF offsets) and submits. */
static __always_inline struct tt_event *tt_state_event(__u64 sk, int oldstate, int newstate)
{
#ifdef TT_OWNER_TRACKING
    if (newstate == TT_TCP_CLOSE)
        owners.delete(&sk);
#endif
    struct tt_event *e = tt_reserve(TT_STATE);
    if (!e)
        return 0;
    e->skaddr = sk;
    e->oldstate = oldstate;
    e->newstate = newstate;
#if TT_SK_ERR_OFFSET >= 0
    if (newstate == TT_TCP_CLOSE)
        bpf_probe_read_kernel(&e->err, sizeof(e->err), (void *)(sk + TT_SK_ERR_OFFSET));
#endif
    return e;
}

#ifdef TT_RAW
/* Raw tracepoint (sk, oldstate, newstate), fields at BTF offsets: raw tracepoint programs are not skipped by
 * the per-CPU guard that makes a classic tracepoint program miss a softirq arriving while another of our
 * programs runs on that CPU. */
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    __u64 sk = ctx->args[0];
    __u16 protocol = 0;
    TT_RD(protocol, sk + TT_OFF_SK_PROTOCOL);
    if (protocol != TT_IPPROTO_TCP)
        return 0;
    struct tt_event *e = tt_state_event(sk, (int)ctx->args[1], (int)ctx->args[2]);
    if (!e)
        return 0;
    tt_tuple(e, sk, 1);
    tt_submit(ctx, e);
    return 0;
}
#else
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != TT_IPPROTO_TCP)
        return 0;
    __u64 sk = (__u64)args->skaddr;
    struct tt_event *e = tt_state_event(sk, args->oldstate, args->newstate);
    if (!e)
        return 0;
    e->family = args->family;
    e->sport = args->sport;
    e->dport = args->dport;
    /* For AF_INET the v6 fields hold the IPv4-mapped address, so one copy serves both families. */
    __builtin_memcpy(e->saddr, args->saddr_v6, 16);
    __builtin_memcpy(e->daddr, args->daddr_v6, 16);
    tt_submit(args, e);
    return 0;
}
#endif
