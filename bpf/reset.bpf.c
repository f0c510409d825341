/* reset.bpf.c: RSTs sent (tcp:tcp_send_reset) and received (tcp:tcp_receive_reset).
 *
 * tcp_send_reset changed in 6.10: it fires for every RST, skaddr is 0 when no socket owns the segment
 * (a SYN to a closed port), it carries the reason, and addresses come as sockaddr_in/in6 in 28-byte fields
 * (TT_SEND_RESET_SOCKADDR).  Before 6.10 it fires only for full sockets and has plain address fields.
 */
#include "common.h"

#ifdef TT_SEND_RESET_SOCKADDR
/* sockaddr_in: family(2) port(2, network order) addr(4); sockaddr_in6: family port flowinfo(4) addr(16). */
static __always_inline void tt_from_sockaddr(const __u8 *sa, __u8 *addr, __u16 *port, __u16 *family)
{
    __u16 fam = sa[0] | (sa[1] << 8);
    *family = fam;
    *port = (sa[2] << 8) | sa[3];
    if (fam == TT_AF_INET) {
        addr[10] = 0xff;
        addr[11] = 0xff;
        __builtin_memcpy(addr + 12, sa + 4, 4);
    } else if (fam == TT_AF_INET6) {
        __builtin_memcpy(addr, sa + 8, 16);
    }
}
#endif

TRACEPOINT_PROBE(tcp, tcp_send_reset)
{
    struct tt_event *e = tt_reserve(TT_RESET_SENT);
    if (!e)
        return 0;
    e->skaddr = (__u64)args->skaddr;
#ifdef TT_SEND_RESET_HAS_STATE
    e->oldstate = args->state;
#endif
#ifdef TT_SEND_RESET_HAS_REASON
    e->err = args->reason;
#else
    e->err = -1;
#endif
#ifdef TT_SEND_RESET_SOCKADDR
    __u8 sa[28];
    __builtin_memcpy(sa, args->saddr, 28);
    tt_from_sockaddr(sa, e->saddr, &e->sport, &e->family);
    __builtin_memcpy(sa, args->daddr, 28);
    tt_from_sockaddr(sa, e->daddr, &e->dport, &e->family);
#else
#ifdef TT_SEND_RESET_HAS_FAMILY
    e->family = args->family;
#endif
    e->sport = args->sport;
    e->dport = args->dport;
    __builtin_memcpy(e->saddr, args->saddr_v6, 16);
    __builtin_memcpy(e->daddr, args->daddr_v6, 16);
#endif
    tt_submit(args, e);
    return 0;
}

#ifdef TT_RAW
RAW_TRACEPOINT_PROBE(tcp_receive_reset)  /* (sk) */
{
    __u64 sk = ctx->args[0];
    struct tt_event *e = tt_reserve(TT_RESET_RECV);
    if (!e)
        return 0;
    e->skaddr = sk;
    tt_tuple(e, sk, 1);
    tt_submit(ctx, e);
    return 0;
}
#else
TRACEPOINT_PROBE(tcp, tcp_receive_reset)
{
    struct tt_event *e = tt_reserve(TT_RESET_RECV);
    if (!e)
        return 0;
    e->skaddr = (__u64)args->skaddr;
#ifdef TT_RECEIVE_RESET_HAS_FAMILY
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
