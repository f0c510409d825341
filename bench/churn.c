/* churn.c: a TCP connection-churn load on loopback, bounded in time, for the tcptrace-bpf benchmark.
 *
 * Why C: the tracer's cost is measured as the throughput the load loses while it is traced.  A load
 * generator in Python would spend most of each connection in its own interpreter, so the kernel-side and
 * frontend costs of tracing would hide inside the generator's overhead.  A C loop spends its time in the
 * kernel's TCP code, which is exactly what tracing taxes.
 *
 * One connection, the same as the loop measured in issue 6:
 *   client: socket, connect, send 1 byte, read until EOF, close
 *   server: accept, read the byte, close  (the server closes first)
 * The server closing first puts TIME_WAIT on the server's side (its listening port, many client ports), so the
 * client's ephemeral ports are free again as soon as its close returns: the client never runs out of ports
 * however long the run, and no sysctl (tcp_tw_reuse, ip_local_port_range) has to be changed.  A new SYN that
 * meets an old server-side TIME_WAIT socket for the same 4-tuple is accepted by the kernel (its sequence
 * number and timestamp are newer); when tcp_max_tw_buckets is full the kernel skips TIME_WAIT, which changes
 * nothing the tracer sees (FIN_WAIT2 -> CLOSE either way).
 *
 * Every connection makes 10 state changes (client CLOSE>SYN_SENT>ESTABLISHED>CLOSE_WAIT>LAST_ACK>CLOSE,
 * server LISTEN>SYN_RECV>ESTABLISHED>FIN_WAIT1>FIN_WAIT2>CLOSE).
 *
 * Usage: churn -d SECONDS [-w CLIENTS] [-s SERVERS] [-a ADDRESS] [-r RATE]
 *   -d  how long the clients run (required; the process also ends itself by alarm at SECONDS + 15)
 *   -w  client threads (default 2), each running the loop above back to back
 *   -s  server threads accepting on the one listening socket (default: as many as clients)
 *   -a  127.0.0.1 (default) or ::1; the listener takes a free port chosen by the kernel
 *   -r  total connections per second to aim for (default 0: as fast as possible), spread over the clients
 * Prints one JSON line on stdout when done:
 *   {"connections": N, "seconds": S, "rate": N/S, "errors": E, "clients": W, "servers": V, "port": P}
 * A line "ready" goes to stderr once the listener is up and the clients are about to start.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_storage server_addr;
static socklen_t server_len;
static int listen_fd = -1;
static double run_seconds;
static double per_client_rate;
static struct timespec start_ts;
static atomic_int stopping;
static atomic_long total_connections;
static atomic_long total_errors;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double since_start(void)
{
    return now_s() - ((double)start_ts.tv_sec + (double)start_ts.tv_nsec / 1e9);
}

static void die(const char *what)
{
    perror(what);
    exit(2);
}

/* One connection from the client side; returns 0 on success. */
static int one_connection(void)
{
    int fd = socket(server_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    char byte = 'x';
    char buf[16];
    int rc = -1;
    if (connect(fd, (struct sockaddr *)&server_addr, server_len) != 0)
        goto out;
    if (send(fd, &byte, 1, MSG_NOSIGNAL) != 1)
        goto out;
    for (;;) {
        ssize_t n = recv(fd, buf, sizeof(buf), 0);
        if (n == 0) {
            rc = 0;
            break;
        }
        if (n < 0 && errno != EINTR)
            break;
    }
out:
    close(fd);
    return rc;
}

static void *client_main(void *arg)
{
    (void)arg;
    long done = 0, errors = 0;
    double interval = per_client_rate > 0 ? 1.0 / per_client_rate : 0;
    double next = now_s();
    while (!atomic_load_explicit(&stopping, memory_order_relaxed)) {
        if (interval > 0) {
            double t = now_s();
            if (next > t) {
                double wait = next - t;
                struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
                nanosleep(&ts, NULL);
            } else if (t - next > 1.0) {
                next = t; /* more than a second behind: do not burst to catch up */
            }
            next += interval;
        }
        if (one_connection() == 0) {
            done++;
        } else {
            errors++;
            if (errors % 1000 == 1)
                fprintf(stderr, "churn: connection failed: %s\n", strerror(errno));
        }
        /* Flush counts now and then so the total is right however the run ends. */
        if ((done & 255) == 0) {
            atomic_fetch_add(&total_connections, done);
            done = 0;
        }
        if (since_start() >= run_seconds)
            break;
    }
    atomic_fetch_add(&total_connections, done);
    atomic_fetch_add(&total_errors, errors);
    return NULL;
}

static void *server_main(void *arg)
{
    (void)arg;
    char buf[16];
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (atomic_load(&stopping))
                break;
            if (errno == EINTR || errno == ECONNABORTED || errno == EMFILE || errno == ENFILE)
                continue;
            break;
        }
        /* Read the client's byte before closing: closing with unread data would send a RST. */
        while (recv(fd, buf, sizeof(buf), 0) < 0 && errno == EINTR) {
        }
        close(fd);
    }
    return NULL;
}

static void usage(void)
{
    fprintf(stderr, "usage: churn -d SECONDS [-w CLIENTS] [-s SERVERS] [-a 127.0.0.1|::1] [-r RATE]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    int clients = 2, servers = 0, opt;
    const char *address = "127.0.0.1";
    double rate = 0;
    run_seconds = 0;
    while ((opt = getopt(argc, argv, "d:w:s:a:r:")) != -1) {
        switch (opt) {
        case 'd': run_seconds = atof(optarg); break;
        case 'w': clients = atoi(optarg); break;
        case 's': servers = atoi(optarg); break;
        case 'a': address = optarg; break;
        case 'r': rate = atof(optarg); break;
        default: usage();
        }
    }
    if (run_seconds <= 0 || run_seconds > 3600 || clients < 1 || clients > 256 || servers < 0 || servers > 256 ||
        rate < 0)
        usage();
    if (servers == 0)
        servers = clients;
    per_client_rate = rate / clients;
    /* Bounded whatever happens to the parent: the default action of SIGALRM ends the process. */
    alarm((unsigned)run_seconds + 15);
    signal(SIGPIPE, SIG_IGN);

    memset(&server_addr, 0, sizeof(server_addr));
    struct sockaddr_in *v4 = (struct sockaddr_in *)&server_addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&server_addr;
    if (inet_pton(AF_INET, address, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        server_len = sizeof(*v4);
    } else if (inet_pton(AF_INET6, address, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        server_len = sizeof(*v6);
    } else {
        fprintf(stderr, "churn: %s is not an IPv4 or IPv6 address\n", address);
        return 2;
    }
    /* Loopback only: this load must never leave the machine. */
    if (!(v4->sin_family == AF_INET && (ntohl(v4->sin_addr.s_addr) >> 24) == 127) &&
        !(server_addr.ss_family == AF_INET6 && IN6_IS_ADDR_LOOPBACK(&v6->sin6_addr))) {
        fprintf(stderr, "churn: %s is not a loopback address\n", address);
        return 2;
    }

    listen_fd = socket(server_addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (listen_fd < 0)
        die("socket");
    int one = 1;
    setsockopt(listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(listen_fd, (struct sockaddr *)&server_addr, server_len) != 0)
        die("bind");
    if (listen(listen_fd, 4096) != 0)
        die("listen");
    if (getsockname(listen_fd, (struct sockaddr *)&server_addr, &server_len) != 0)
        die("getsockname");
    int port = ntohs(server_addr.ss_family == AF_INET ? v4->sin_port : v6->sin6_port);

    pthread_t *threads = calloc((size_t)(clients + servers), sizeof(pthread_t));
    if (!threads)
        die("calloc");
    for (int i = 0; i < servers; i++)
        if (pthread_create(&threads[clients + i], NULL, server_main, NULL) != 0)
            die("pthread_create");
    fprintf(stderr, "ready\n");
    clock_gettime(CLOCK_MONOTONIC, &start_ts);
    for (int i = 0; i < clients; i++)
        if (pthread_create(&threads[i], NULL, client_main, NULL) != 0)
            die("pthread_create");
    for (int i = 0; i < clients; i++)
        pthread_join(threads[i], NULL);
    double elapsed = since_start();
    /* Every client socket is closed now, so each server thread is back in accept(): wake and end them. */
    atomic_store(&stopping, 1);
    shutdown(listen_fd, SHUT_RDWR);
    for (int i = 0; i < servers; i++)
        pthread_join(threads[clients + i], NULL);
    close(listen_fd);
    long n = atomic_load(&total_connections);
    printf("{\"connections\": %ld, \"seconds\": %.6f, \"rate\": %.1f, \"errors\": %ld, \"clients\": %d, "
           "\"servers\": %d, \"port\": %d}\n",
           n, elapsed, elapsed > 0 ? (double)n / elapsed : 0.0, atomic_load(&total_errors), clients, servers, port);
    free(threads);
    return 0;
}
