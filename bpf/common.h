/* common.h: delivery of tt_event to user space, shared by every program.
 *
 * Ring buffer where the kernel has one (5.8+), perf buffer otherwise.  Every event that cannot be delivered
 * is counted: a failed ring-buffer reserve here, in `lost` per CPU; perf-buffer losses in user space.
 * Compile-time switches come from tcptrace_bpf/plan.py and are numbers or feature flags, never user text.
 */
#ifndef TT_COMMON_H
#define TT_COMMON_H

#include <uapi/linux/ptrace.h>
#include "tcptrace.h"

#define TT_AF_INET 2
#define TT_AF_INET6 10
#define TT_IPPROTO_TCP 6
#define TT_TCP_TIME_WAIT 6
#define TT_TCP_CLOSE 7

#ifdef TT_DECLARE_SK_RST_REASON
/* tcp:tcp_send_reset (6.10+) has a field of this type; older headers lack the enum. */
enum sk_rst_reason { TT_SK_RST_REASON_PLACEHOLDER };
#endif

BPF_PERCPU_ARRAY(lost, __u64, TT_KIND_SLOTS);  /* failed reserves, per CPU and event kind */

#ifdef TT_RINGBUF
BPF_RINGBUF_OUTPUT(events, TT_RINGBUF_PAGES);
#else
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(scratch, struct tt_event, 1);
#endif

#ifdef TT_OWNER_TRACKING
/* Sockets whose owner was already reported, so I/O reports each owner once, not once per send. */
BPF_TABLE("lru_hash", __u64, __u32, owners, 65536);
#endif

#define TT_RD(dst, addr) bpf_probe_read_kernel(&(dst), sizeof(dst), (void *)(addr))

#ifdef TT_OFF_SKC_FAMILY
/* The 4-tuple of a socket, read at BTF offsets (raw tracepoints give only the pointer).  Local port: from
 * inet_sock.inet_sport for a full socket (skc_num is already 0 at ->CLOSE, and that is what the classic
 * tracepoint reads too), from skc_num for a timewait socket, which has no inet_sock. */
static __always_inline void tt_tuple(struct tt_event *e, __u64 base, int full)
{
    __u16 family = 0, dport = 0, sport = 0;
    TT_RD(family, base + TT_OFF_SKC_FAMILY);
    TT_RD(dport, base + TT_OFF_SKC_DPORT);
    e->dport = (dport >> 8) | ((dport & 0xff) << 8);
#ifdef TT_OFF_INET_SPORT
    if (full) {
        TT_RD(sport, base + TT_OFF_INET_SPORT);
        e->sport = (sport >> 8) | ((sport & 0xff) << 8);
    } else
#endif
        TT_RD(e->sport, base + TT_OFF_SKC_NUM);
    e->family = family;
    if (family == TT_AF_INET) {
        e->saddr[10] = e->saddr[11] = e->daddr[10] = e->daddr[11] = 0xff;
        bpf_probe_read_kernel(e->saddr + 12, 4, (void *)(base + TT_OFF_SKC_RCV_SADDR));
        bpf_probe_read_kernel(e->daddr + 12, 4, (void *)(base + TT_OFF_SKC_DADDR));
    } else {
        bpf_probe_read_kernel(e->saddr, 16, (void *)(base + TT_OFF_SKC_V6_RCV_SADDR));
        bpf_probe_read_kernel(e->daddr, 16, (void *)(base + TT_OFF_SKC_V6_DADDR));
    }
}
#endif

/* A record of `kind` to fill and submit, or NULL: the ring buffer is full, counted in lost[kind]. */
static __always_inline struct tt_event *tt_reserve(__u16 kind)
{
    struct tt_event *e;
#ifdef TT_RINGBUF
    e = events.ringbuf_reserve(sizeof(struct tt_event));
    if (!e) {
        int slot = kind < TT_KIND_SLOTS ? kind : 0;
        __u64 *n = lost.lookup(&slot);
        if (n)
            (*n)++;
        return 0;
    }
#else
    int zero = 0;
    e = scratch.lookup(&zero);
    if (!e)
        return 0;
#endif
    __u64 id = bpf_get_current_pid_tgid();
    e->kind = kind;
    e->ts_ns = bpf_ktime_get_ns();
    e->pid = id >> 32;
    e->err = 0;
    e->family = 0;
    e->sport = 0;
    e->dport = 0;
    e->oldstate = 0;
    e->newstate = 0;
    __builtin_memset(e->pad, 0, sizeof(e->pad));
    __builtin_memset(e->saddr, 0, sizeof(e->saddr));
    __builtin_memset(e->daddr, 0, sizeof(e->daddr));
    bpf_get_current_comm(e->comm, sizeof(e->comm));
    return e;
}

static __always_inline void tt_submit(void *ctx, struct tt_event *e)
{
#ifdef TT_RINGBUF
    events.ringbuf_submit(e, 0);
#else
    events.perf_submit(ctx, e, sizeof(*e));
#endif
}

#ifdef TT_OFF_TW_TIMER
/* One TT_TIMEWAIT event for the timewait socket `tw`: its 4-tuple, substate and the jiffies left on its
 * timer (`left`, or read from the timer when negative).  Shared by both ways of seeing the timer. */
static __always_inline int tt_timewait_event(void *ctx, __u64 tw, __u8 phase, __s64 left)
{
    struct tt_event *e = tt_reserve(TT_TIMEWAIT);
    if (!e)
        return 0;
    e->newstate = phase;
    e->skaddr = tw;
    TT_RD(e->oldstate, tw + TT_OFF_TW_SUBSTATE);
    if (left < 0) {
        __u64 expires = 0;
        TT_RD(expires, tw + TT_OFF_TW_TIMER + TT_OFF_TIMER_EXPIRES);
        left = (__s64)(expires - bpf_jiffies64());
    }
    e->err = (__s32)left;
    tt_tuple(e, tw, 0);
    tt_submit(ctx, e);
    return 0;
}
#endif

#endif
