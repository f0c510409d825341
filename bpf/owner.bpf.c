/* owner.bpf.c: who owns a socket, from sock:sock_send_length / sock:sock_recv_length (6.3+).
 *
 * State changes driven by packets run in softirq or, on loopback, inside the *sending* process, so the task
 * seen at a transition is often not the owner.  send/recv always run in the owner's own syscall: the first
 * I/O by a task on a socket (and every change of that task) is reported once, then suppressed by `owners`.
 */
#include "common.h"

static __always_inline int tt_note_owner(void *ctx, __u64 sk, __u16 family, __u16 protocol)
{
    if (protocol != TT_IPPROTO_TCP || (family != TT_AF_INET && family != TT_AF_INET6))
        return 0;
    __u32 tgid = bpf_get_current_pid_tgid() >> 32;
    __u32 *seen = owners.lookup(&sk);
    if (seen && *seen == tgid)
        return 0;
    owners.update(&sk, &tgid);
    struct tt_event *e = tt_reserve(TT_OWNER);
    if (!e)
        return 0;
    e->skaddr = sk;
    e->family = family;
    tt_submit(ctx, e);
    return 0;
}

#ifdef TT_RAW
static __always_inline int tt_note_owner_raw(void *ctx, __u64 sk)
{
    __u16 family = 0, protocol = 0;
    TT_RD(family, sk + TT_OFF_SKC_FAMILY);
    TT_RD(protocol, sk + TT_OFF_SK_PROTOCOL);
    return tt_note_owner(ctx, sk, family, protocol);
}

RAW_TRACEPOINT_PROBE(sock_send_length)  /* (sk, ret, flags) */
{
    return tt_note_owner_raw(ctx, ctx->args[0]);
}

RAW_TRACEPOINT_PROBE(sock_recv_length)
{
    return tt_note_owner_raw(ctx, ctx->args[0]);
}
#else
TRACEPOINT_PROBE(sock, sock_send_length)
{
    return tt_note_owner(args, (__u64)args->sk, args->family, args->protocol);
}

TRACEPOINT_PROBE(sock, sock_recv_length)
{
    return tt_note_owner(args, (__u64)args->sk, args->family, args->protocol);
}
#endif
