/* tcptrace.h: the one event record every program emits.
 *
 * Mirrored once in Python (tcptrace_bpf/wire.py, EVENT_FIELDS); tests/unit/test_wire.py checks the two agree.
 * Keep the layout free of implicit padding: every field is naturally aligned and the size is a multiple of 8.
 */
#ifndef TCPTRACE_H
#define TCPTRACE_H

#define TT_COMM_LEN 16

enum tt_kind {
    TT_STATE = 1,        /* sock:inet_sock_set_state; oldstate/newstate; err = sk->sk_err at ->CLOSE */
    TT_RETRANSMIT = 2,   /* tcp:tcp_retransmit_skb (or kprobe); oldstate = state when retransmitted */
    TT_RESET_SENT = 3,   /* tcp:tcp_send_reset; skaddr may be 0 (no socket); err = reset reason or -1 */
    TT_RESET_RECV = 4,   /* tcp:tcp_receive_reset */
    TT_OWNER = 5,        /* sock:sock_{send,recv}_length: a task doing I/O on the socket, so its owner */
    TT_TIMEWAIT = 6,     /* a timewait socket's timer (timers.bpf.c or phases.bpf.c): skaddr = the
                            inet_timewait_sock, newstate = enum tt_phase, oldstate = tw_substate,
                            err = jiffies left on its timer */
    TT_KEEPALIVE = 7,    /* a keepalive probe went out: newstate = TT_KA_PROBE, oldstate = probes unanswered */
};

#define TT_KIND_SLOTS 8  /* enum tt_kind values fit below this: the lost counter has a slot per kind */

enum tt_phase {
    TT_TIMER_START = 1,  /* armed: the timewait socket was created, or re-armed (FIN_WAIT2 -> TIME_WAIT) */
    TT_TIMER_CANCEL = 2, /* stopped before it ran: killed early, unless a start follows (a re-arm) */
    TT_TIMER_EXPIRE = 3, /* ran: the timewait socket's natural end */
    TT_KA_PROBE = 4,
};

struct tt_event {
    __u64 ts_ns;         /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
    __u64 skaddr;        /* kernel socket address: the socket's identity while it lives */
    __u32 pid;           /* tgid of the task running when the hook fired (not always the owner) */
    __s32 err;           /* see enum tt_kind */
    __u16 kind;
    __u16 family;        /* AF_INET or AF_INET6 (0 when unknown) */
    __u16 sport;         /* host order */
    __u16 dport;         /* host order */
    __u8 oldstate;
    __u8 newstate;
    __u8 pad[6];
    __u8 saddr[16];      /* IPv6, or IPv4-mapped IPv6 */
    __u8 daddr[16];
    char comm[TT_COMM_LEN];
};

#endif
