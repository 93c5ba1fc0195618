/*
 * fault-proxy: a TCP proxy 127.0.0.1:LISTEN → 127.0.0.1:TARGET that injects connection faults on command.
 *
 *   fault-proxy LISTEN_PORT TARGET_PORT CONTROL_FIFO
 *
 * Commands, one per line written to CONTROL_FIFO (created if missing):
 *   cut            shutdown + close both sides of every current connection (both peers see EOF)
 *   reset          close both sides with SO_LINGER {1, 0}: both peers get an RST
 *   stall SECONDS  forward nothing either way and accept nothing for SECONDS; connections stay open
 *   resume         end a stall now
 * New connections are accepted and forwarded whenever the proxy is not stalled. One line per event on stdout,
 * CLOCK_REALTIME seconds.nanoseconds, flushed at once: "listening", "accept", "cut n=N", "reset n=N",
 * "stall s=S", "resume", "close" (a peer closed its side).
 *
 * Single-threaded poll loop; each direction has its own buffer, and a side is only read while the buffer towards
 * the other side is empty, so a slow peer back-pressures the fast one instead of growing memory.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAIRS 64
#define BUF (256 * 1024)

struct dir {
    char *buf;
    size_t len, off;
};

struct pair {
    int fd[2];        /* 0: client (the daemon/kernel side), 1: server */
    struct dir to[2]; /* to[i]: bytes waiting to be written to fd[i] */
    int used;
};

static struct pair pairs[MAX_PAIRS];
static int stalled;
static double stall_until;

static double now_real(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void log_event(const char *what)
{
    printf("%.6f %s\n", now_real(), what);
    fflush(stdout);
}

static int tcp_listen(int port)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(s, (struct sockaddr *)&a, sizeof a) != 0 || listen(s, 16) != 0) {
        perror("fault-proxy: listen");
        exit(1);
    }
    return s;
}

static int tcp_connect(int port)
{
    int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(s, (struct sockaddr *)&a, sizeof a) != 0) {
        close(s);
        return -1;
    }
    return s;
}

static void set_nonblock(int s)
{
    int one = 1;
    fcntl(s, F_SETFL, fcntl(s, F_GETFL) | O_NONBLOCK);
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void close_pair(struct pair *p, int rst)
{
    for (int i = 0; i < 2; i++) {
        if (rst) {
            struct linger l = { .l_onoff = 1, .l_linger = 0 };
            setsockopt(p->fd[i], SOL_SOCKET, SO_LINGER, &l, sizeof l);
        } else {
            shutdown(p->fd[i], SHUT_RDWR);
        }
        close(p->fd[i]);
        free(p->to[i].buf);
    }
    memset(p, 0, sizeof *p);
}

static int close_all(int rst)
{
    int n = 0;
    for (int i = 0; i < MAX_PAIRS; i++)
        if (pairs[i].used) { close_pair(&pairs[i], rst); n++; }
    return n;
}

static void command(char *line)
{
    char msg[128];
    if (strncmp(line, "cut", 3) == 0) {
        snprintf(msg, sizeof msg, "cut n=%d", close_all(0));
        log_event(msg);
    } else if (strncmp(line, "reset", 5) == 0) {
        snprintf(msg, sizeof msg, "reset n=%d", close_all(1));
        log_event(msg);
    } else if (strncmp(line, "stall", 5) == 0) {
        double s = atof(line + 5);
        stalled = 1;
        stall_until = now_real() + (s > 0 ? s : 3600);
        snprintf(msg, sizeof msg, "stall s=%.3f", s);
        log_event(msg);
    } else if (strncmp(line, "resume", 6) == 0) {
        stalled = 0;
        log_event("resume");
    } else if (line[0]) {
        snprintf(msg, sizeof msg, "unknown-command %.60s", line);
        log_event(msg);
    }
}

/* Moves bytes for one pair; returns -1 when a side closed or failed (the pair is then closed). */
static int pump(struct pair *p, short rev[2])
{
    for (int i = 0; i < 2; i++) {
        int other = 1 - i;
        struct dir *d = &p->to[other];
        if ((rev[i] & (POLLIN | POLLHUP | POLLERR)) && d->len == 0) {
            ssize_t r = read(p->fd[i], d->buf, BUF);
            if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) return -1;
            if (r > 0) { d->len = (size_t)r; d->off = 0; }
        }
        if (d->len > d->off) {
            ssize_t w = write(p->fd[other], d->buf + d->off, d->len - d->off);
            if (w < 0 && errno != EAGAIN && errno != EINTR) return -1;
            if (w > 0) d->off += (size_t)w;
            if (d->off == d->len) d->len = d->off = 0;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fputs("usage: fault-proxy LISTEN_PORT TARGET_PORT CONTROL_FIFO\n", stderr);
        return 2;
    }
    int target = atoi(argv[2]);
    signal(SIGPIPE, SIG_IGN);
    if (mkfifo(argv[3], 0600) != 0 && errno != EEXIST) { perror(argv[3]); return 1; }
    /* O_RDWR: the FIFO never reports EOF when a writer goes away */
    int ctl = open(argv[3], O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (ctl < 0) { perror(argv[3]); return 1; }
    int lst = tcp_listen(atoi(argv[1]));
    log_event("listening");
    char cbuf[512];
    size_t clen = 0;
    for (;;) {
        struct pollfd pfd[2 + 2 * MAX_PAIRS];
        int map[2 + 2 * MAX_PAIRS], n = 0;
        if (stalled && now_real() >= stall_until) { stalled = 0; log_event("resume"); }
        pfd[n++] = (struct pollfd){ .fd = ctl, .events = POLLIN };
        pfd[n++] = (struct pollfd){ .fd = lst, .events = stalled ? 0 : POLLIN };
        if (!stalled)
            for (int i = 0; i < MAX_PAIRS; i++) {
                if (!pairs[i].used) continue;
                for (int s = 0; s < 2; s++) {
                    short ev = 0;
                    if (pairs[i].to[1 - s].len == 0) ev |= POLLIN;
                    if (pairs[i].to[s].len > 0) ev |= POLLOUT;
                    map[n] = i * 2 + s;
                    pfd[n++] = (struct pollfd){ .fd = pairs[i].fd[s], .events = ev };
                }
            }
        int timeout = stalled ? 20 : 1000;
        if (poll(pfd, (nfds_t)n, timeout) < 0 && errno != EINTR) { perror("poll"); return 1; }
        if (pfd[0].revents & POLLIN) {
            ssize_t r = read(ctl, cbuf + clen, sizeof cbuf - 1 - clen);
            if (r > 0) {
                clen += (size_t)r;
                cbuf[clen] = 0;
                char *nl;
                while ((nl = strchr(cbuf, '\n'))) {
                    *nl = 0;
                    command(cbuf);
                    memmove(cbuf, nl + 1, clen - (size_t)(nl + 1 - cbuf) + 1);
                    clen -= (size_t)(nl + 1 - cbuf);
                }
                if (clen == sizeof cbuf - 1) clen = 0; /* an overlong line: drop it */
            }
            continue; /* the pair table may have changed under the poll set */
        }
        if (!stalled && (pfd[1].revents & POLLIN)) {
            int c = accept4(lst, NULL, NULL, SOCK_CLOEXEC);
            if (c >= 0) {
                int s = tcp_connect(target), slot = -1;
                for (int i = 0; i < MAX_PAIRS && slot < 0; i++) if (!pairs[i].used) slot = i;
                if (s < 0 || slot < 0) {
                    close(c);
                    if (s >= 0) close(s);
                    log_event(s < 0 ? "accept target-refused" : "accept table-full");
                } else {
                    struct pair *p = &pairs[slot];
                    p->used = 1;
                    p->fd[0] = c;
                    p->fd[1] = s;
                    p->to[0].buf = malloc(BUF);
                    p->to[1].buf = malloc(BUF);
                    set_nonblock(c);
                    set_nonblock(s);
                    log_event("accept");
                }
            }
        }
        if (stalled) continue;
        short rev[MAX_PAIRS][2] = { { 0 } };
        for (int k = 2; k < n; k++) rev[map[k] / 2][map[k] % 2] = pfd[k].revents;
        for (int i = 0; i < MAX_PAIRS; i++) {
            if (!pairs[i].used || (!rev[i][0] && !rev[i][1])) continue;
            if (pump(&pairs[i], rev[i]) != 0) {
                close_pair(&pairs[i], 0);
                log_event("close");
            }
        }
    }
}
