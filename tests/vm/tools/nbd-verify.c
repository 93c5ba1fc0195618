/*
 * nbd-verify: a write-then-verify load for a block device, built static so it runs in the busybox VM.
 *
 *   nbd-verify run --device PATH --stop-file PATH --events PATH --status PATH [--region-mib N] [--seed N]
 *                  [--reopen-on-error] [--gap-ms N] [--map-out PATH] [--final-retry-s N (60)]
 *   nbd-verify check --device PATH --map PATH [--events PATH]   verify a device/file against a saved generation map
 *   nbd-verify now                                     CLOCK_REALTIME as seconds.nanoseconds
 *   nbd-verify waitport PORT TIMEOUT_S                 first time a TCP connect to 127.0.0.1:PORT succeeds
 *
 * run: 4 KiB O_DIRECT blocks over the first N MiB. Every block written carries a header (magic, block index,
 * run id, generation, crc32 of the payload) and a payload derived from (index, run id, generation), so a read-back
 * proves both where the data came from and that it is intact. The run id (random per run) tells this run's blocks
 * from an earlier run's: a block this run never wrote successfully may hold anything from before. Three writes, then one read-back of an earlier block, in a loop
 * until the stop file appears or SIGTERM/SIGINT arrives; then every block written is read back and checked against
 * the generation map kept in memory.
 *
 * A write that failed leaves the block holding either its previous generation or the attempted one (the request
 * may or may not have reached the server), so both are accepted until the next successful write of that block.
 *
 * --reopen-on-error: after an I/O error close the device, wait 100 ms and open it again. That is what an
 * application must do on an ioctl-configured nbd device: the driver keeps the dead socket until the last close.
 *
 * Events file, one line each, flushed at once (times are CLOCK_REALTIME seconds.nanoseconds):
 *   gap start=T end=T ms=N [open=1]      no I/O completed successfully for longer than --gap-ms
 *   error op=write|read|final|open block=N errno=NAME t=T
 *   verify_fail phase=loop|final block=N want=G got=G reason=WHY recent=0|1 t=T
 *   reopen t=T
 * Status file (rewritten every ~200 ms and at the end): key=value on one line, see write_status().
 * Report on stdout at the end: the same keys as the status file.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define BLOCK 4096u
#define HEADER 32u
#define MAGIC 0x3159465256444e42ull /* "BNDVRFY1" little-endian */
#define MAX_ALTS 4
#define FINAL_CHUNK 64u /* blocks per read in the final pass */

struct block_state {
    uint64_t gen;             /* last generation known to be on the device (0: never written successfully) */
    uint64_t alts[MAX_ALTS];  /* generations of failed writes that may have landed anyway */
    uint64_t written_seq;     /* op sequence number of the last successful write */
};

static volatile sig_atomic_t stop_signal;
static void on_stop(int sig) { (void)sig; stop_signal = 1; }

static struct {
    const char *device, *stop_file, *events_path, *status_path, *map_out, *map_in;
    uint32_t blocks;
    uint64_t seed;
    int reopen;
    long gap_ms;
    double final_retry_s;
} opt = { .blocks = (32u << 20) / BLOCK, .seed = 1, .gap_ms = 50, .final_retry_s = 60 };

static struct {
    uint64_t writes, reads, write_errors, read_errors, open_errors, reopens;
    uint64_t verify_failures, verify_failures_recent, verify_failures_final, final_checked, final_read_errors;
    uint64_t gaps, seq, last_error_seq;
    double max_gap_ms, last_ok, start;
    int direct;
} st;

static FILE *events;
static uint32_t run_id;
static struct block_state *map;
static int fd = -1;

static double now_real(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void event(const char *fmt, ...)
{
    if (!events) return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(events, fmt, ap);
    va_end(ap);
    fputc('\n', events);
    fflush(events);
}

/* crc32 (IEEE 802.3, reflected 0xEDB88320), bitwise: speed is irrelevant next to a TCG VM's I/O. */
static uint32_t crc32_ieee(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void fill_block(uint8_t *b, uint32_t index, uint64_t gen)
{
    uint64_t s = ((uint64_t)index << 32) ^ gen ^ ((uint64_t)run_id << 17) ^ 0x5bd1e995ull;
    for (uint32_t i = HEADER; i < BLOCK; i += 8) {
        uint64_t v = splitmix(&s);
        memcpy(b + i, &v, 8);
    }
    uint64_t magic = MAGIC;
    uint32_t zero = 0, crc = crc32_ieee(b + HEADER, BLOCK - HEADER);
    memcpy(b, &magic, 8);
    memcpy(b + 8, &index, 4);
    memcpy(b + 12, &run_id, 4);
    memcpy(b + 16, &gen, 8);
    memcpy(b + 24, &crc, 4);
    memcpy(b + 28, &zero, 4);
}

/* Checks one block read back; returns NULL when it holds an acceptable generation, else why not. */
static const char *check_block(const uint8_t *b, uint32_t index, const struct block_state *bs, uint64_t *got)
{
    static uint8_t want[BLOCK] __attribute__((aligned(4096)));
    uint64_t magic, gen;
    uint32_t idx, crc, run;
    memcpy(&magic, b, 8);
    memcpy(&idx, b + 8, 4);
    memcpy(&run, b + 12, 4);
    memcpy(&gen, b + 16, 8);
    memcpy(&crc, b + 24, 4);
    *got = magic == MAGIC && run == run_id ? gen : 0;
    /* never written successfully by this run (at most failed attempts): what was there before is fine too */
    if (magic != MAGIC || run != run_id)
        return bs->gen == 0 ? NULL : magic != MAGIC ? "magic" : "run";
    if (idx != index) return "index";
    if (crc32_ieee(b + HEADER, BLOCK - HEADER) != crc) return "crc";
    int known = gen == bs->gen && gen != 0;
    for (int i = 0; i < MAX_ALTS; i++) known |= bs->alts[i] != 0 && gen == bs->alts[i];
    if (!known) return gen < bs->gen ? "stale" : "generation";
    fill_block(want, index, gen);
    if (memcmp(want, b, BLOCK) != 0) return "payload";
    return NULL;
}

static const char *errname(int e)
{
    static char buf[32];
    const char *n = strerrorname_np(e);
    if (n) return n;
    snprintf(buf, sizeof buf, "E%d", e);
    return buf;
}

static int open_device(void)
{
    int f = open(opt.device, O_RDWR | O_DIRECT | O_CLOEXEC);
    if (f < 0 && errno == EINVAL) {
        /* filesystems without O_DIRECT (tmpfs before 6.6): only for the host self-test on plain files */
        f = open(opt.device, O_RDWR | O_CLOEXEC);
        if (f >= 0) st.direct = 0;
    } else if (f >= 0) {
        st.direct = 1;
    }
    return f;
}

static int stop_requested(void)
{
    return stop_signal || (opt.stop_file && access(opt.stop_file, F_OK) == 0);
}

static void write_status(FILE *out)
{
    fprintf(out,
            "writes=%llu reads=%llu write_errors=%llu read_errors=%llu open_errors=%llu reopens=%llu "
            "verify_failures=%llu verify_failures_recent=%llu verify_failures_final=%llu final_checked=%llu final_read_errors=%llu "
            "gaps=%llu max_gap_ms=%.0f last_ok=%.6f direct=%s\n",
            (unsigned long long)st.writes, (unsigned long long)st.reads, (unsigned long long)st.write_errors,
            (unsigned long long)st.read_errors, (unsigned long long)st.open_errors, (unsigned long long)st.reopens,
            (unsigned long long)st.verify_failures, (unsigned long long)st.verify_failures_recent,
            (unsigned long long)st.verify_failures_final,
            (unsigned long long)st.final_checked, (unsigned long long)st.final_read_errors,
            (unsigned long long)st.gaps, st.max_gap_ms, st.last_ok, st.direct ? "yes" : "no");
}

static void save_status(void)
{
    if (!opt.status_path) return;
    char tmp[4096];
    snprintf(tmp, sizeof tmp, "%s.tmp", opt.status_path);
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    write_status(f);
    fclose(f);
    rename(tmp, opt.status_path);
}

/* A successful completion: closes the gap since the previous one if it was longer than --gap-ms. */
static void completed(void)
{
    double t = now_real(), ms = (t - st.last_ok) * 1000.0;
    if (ms > opt.gap_ms) {
        st.gaps++;
        if (ms > st.max_gap_ms) st.max_gap_ms = ms;
        event("gap start=%.6f end=%.6f ms=%.0f", st.last_ok, t, ms);
    }
    st.last_ok = t;
}

static void io_failed(const char *op, uint32_t block, int err)
{
    st.last_error_seq = st.seq;
    event("error op=%s block=%u errno=%s t=%.6f", op, block, err ? errname(err) : "short", now_real());
    if (opt.reopen) {
        if (fd >= 0) close(fd);
        fd = -1;
        while (!stop_requested()) {
            usleep(100 * 1000);
            fd = open_device();
            if (fd >= 0) break;
            st.open_errors++;
            event("error op=open block=0 errno=%s t=%.6f", errname(errno), now_real());
        }
        st.reopens++;
        event("reopen t=%.6f", now_real());
    } else {
        usleep(100 * 1000); /* no busy loop on a failing device */
    }
}

static void verify_failed(const char *phase, uint32_t block, const struct block_state *bs, uint64_t got,
                          const char *why)
{
    int recent = bs->written_seq > st.last_error_seq;
    st.verify_failures++;
    if (recent) st.verify_failures_recent++;
    if (phase[0] == 'f') st.verify_failures_final++;
    event("verify_fail phase=%s block=%u want=%llu got=%llu reason=%s recent=%d t=%.6f", phase, block,
          (unsigned long long)bs->gen, (unsigned long long)got, why, recent, now_real());
}

static void note_failed_write(struct block_state *bs, uint64_t gen)
{
    for (int i = 0; i < MAX_ALTS; i++)
        if (bs->alts[i] == 0) { bs->alts[i] = gen; return; }
    memmove(bs->alts, bs->alts + 1, sizeof(uint64_t) * (MAX_ALTS - 1));
    bs->alts[MAX_ALTS - 1] = gen;
}

static void final_pass(uint8_t *buf)
{
    /* the device may still be recovering when the stop arrives: retry for up to --final-retry-s in all */
    double retry_until = now_real() + opt.final_retry_s;
    for (uint32_t first = 0; first < opt.blocks; first += FINAL_CHUNK) {
        uint32_t n = opt.blocks - first < FINAL_CHUNK ? opt.blocks - first : FINAL_CHUNK;
        int any = 0;
        for (uint32_t i = 0; i < n; i++) {
            struct block_state *bs = &map[first + i];
            any |= bs->gen != 0 || bs->alts[0] != 0;
        }
        if (!any) continue;
        ssize_t r = -1;
        for (;;) {
            if (fd < 0) fd = open_device();
            if (fd >= 0) {
                r = pread(fd, buf, (size_t)n * BLOCK, (off_t)first * BLOCK);
                if (r == (ssize_t)n * BLOCK) break;
            }
            st.final_read_errors++;
            event("error op=final block=%u errno=%s t=%.6f", first, r < 0 ? errname(errno) : "short", now_real());
            if (now_real() >= retry_until) break;
            if (opt.reopen && fd >= 0) { close(fd); fd = -1; }
            usleep(100 * 1000);
        }
        if (r != (ssize_t)n * BLOCK) {
            fprintf(stderr, "nbd-verify: final read of blocks %u..%u failed\n", first, first + n - 1);
            continue;
        }
        for (uint32_t i = 0; i < n; i++) {
            struct block_state *bs = &map[first + i];
            if (bs->gen == 0 && bs->alts[0] == 0) continue;
            uint64_t got;
            const char *why = check_block(buf + (size_t)i * BLOCK, first + i, bs, &got);
            st.final_checked++;
            if (why) verify_failed("final", first + i, bs, got, why);
        }
    }
}

static int save_map(void)
{
    FILE *f = fopen(opt.map_out, "w");
    if (!f) { perror(opt.map_out); return -1; }
    fprintf(f, "blocks %u run %u\n", opt.blocks, run_id);
    for (uint32_t i = 0; i < opt.blocks; i++) {
        struct block_state *bs = &map[i];
        if (bs->gen == 0 && bs->alts[0] == 0) continue;
        fprintf(f, "%u %llu %llu %llu %llu %llu\n", i, (unsigned long long)bs->gen,
                (unsigned long long)bs->alts[0], (unsigned long long)bs->alts[1], (unsigned long long)bs->alts[2],
                (unsigned long long)bs->alts[3]);
    }
    return fclose(f);
}

static int load_map(void)
{
    FILE *f = fopen(opt.map_in, "r");
    if (!f) { perror(opt.map_in); return -1; }
    unsigned blocks, run;
    if (fscanf(f, "blocks %u run %u", &blocks, &run) != 2 || blocks == 0 || blocks > (1u << 24)) {
        fprintf(stderr, "nbd-verify: %s: bad header\n", opt.map_in);
        fclose(f);
        return -1;
    }
    opt.blocks = blocks;
    run_id = run;
    map = calloc(opt.blocks, sizeof *map);
    if (!map) { fclose(f); return -1; }
    unsigned idx;
    unsigned long long g, a0, a1, a2, a3;
    while (fscanf(f, "%u %llu %llu %llu %llu %llu", &idx, &g, &a0, &a1, &a2, &a3) == 6) {
        if (idx >= opt.blocks) continue;
        map[idx].gen = g;
        map[idx].alts[0] = a0; map[idx].alts[1] = a1; map[idx].alts[2] = a2; map[idx].alts[3] = a3;
        map[idx].written_seq = 1; /* everything counts as written after the last error */
    }
    fclose(f);
    return 0;
}

static int run(void)
{
    uint8_t *buf;
    if (posix_memalign((void **)&buf, 4096, (size_t)FINAL_CHUNK * BLOCK) != 0) return 1;
    map = calloc(opt.blocks, sizeof *map);
    if (!map) return 1;
    if (opt.events_path && !(events = fopen(opt.events_path, "a"))) { perror(opt.events_path); return 1; }
    fd = open_device();
    if (fd < 0) { fprintf(stderr, "nbd-verify: open %s: %s\n", opt.device, strerror(errno)); return 1; }
    uint64_t rng = opt.seed, gen = 0, written_blocks = 0;
    uint32_t *written = calloc(opt.blocks, sizeof *written); /* indexes written so far, for read-back picks */
    if (!written) return 1;
    st.start = st.last_ok = now_real();
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    run_id = (uint32_t)(ts.tv_nsec ^ (getpid() << 12) ^ opt.seed) | 1u;
    double next_status = 0;
    for (uint64_t op = 0; !stop_requested(); op++) {
        st.seq++;
        if (fd < 0) { io_failed("open", 0, EBADF); continue; }
        if (op % 4 != 3 || written_blocks == 0) {
            uint32_t index = (uint32_t)(splitmix(&rng) % opt.blocks);
            struct block_state *bs = &map[index];
            fill_block(buf, index, ++gen);
            ssize_t r = pwrite(fd, buf, BLOCK, (off_t)index * BLOCK);
            st.writes++;
            if (r == BLOCK) {
                if (bs->gen == 0 && bs->alts[0] == 0) written[written_blocks++] = index;
                bs->gen = gen;
                memset(bs->alts, 0, sizeof bs->alts);
                bs->written_seq = st.seq;
                completed();
            } else {
                int e = r < 0 ? errno : 0;
                st.write_errors++;
                if (bs->gen == 0 && bs->alts[0] == 0) written[written_blocks++] = index;
                note_failed_write(bs, gen);
                io_failed("write", index, e);
            }
        } else {
            uint32_t index = written[splitmix(&rng) % written_blocks];
            struct block_state *bs = &map[index];
            ssize_t r = pread(fd, buf, BLOCK, (off_t)index * BLOCK);
            st.reads++;
            if (r == BLOCK) {
                completed();
                uint64_t got;
                const char *why = check_block(buf, index, bs, &got);
                if (why) verify_failed("loop", index, bs, got, why);
            } else {
                st.read_errors++;
                io_failed("read", index, r < 0 ? errno : 0);
            }
        }
        double t = now_real();
        if (t >= next_status) { save_status(); next_status = t + 0.2; }
    }
    /* an outage still open at the stop is a gap too */
    double t = now_real();
    if ((t - st.last_ok) * 1000.0 > opt.gap_ms) {
        double ms = (t - st.last_ok) * 1000.0;
        st.gaps++;
        if (ms > st.max_gap_ms) st.max_gap_ms = ms;
        event("gap start=%.6f end=%.6f ms=%.0f open=1", st.last_ok, t, ms);
    }
    final_pass(buf);
    if (opt.map_out && save_map() != 0) return 1;
    save_status();
    write_status(stdout);
    return 0;
}

static int check(void)
{
    uint8_t *buf;
    if (posix_memalign((void **)&buf, 4096, (size_t)FINAL_CHUNK * BLOCK) != 0) return 1;
    if (load_map() != 0) return 1;
    if (opt.events_path && !(events = fopen(opt.events_path, "a"))) { perror(opt.events_path); return 1; }
    fd = open_device();
    if (fd < 0) { fprintf(stderr, "nbd-verify: open %s: %s\n", opt.device, strerror(errno)); return 1; }
    final_pass(buf);
    write_status(stdout);
    return 0;
}

static int waitport(int port, double timeout_s)
{
    double deadline = now_real() + timeout_s;
    struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port) };
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    while (now_real() < deadline) {
        int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0) return 2;
        if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) {
            double t = now_real();
            close(s);
            printf("%.6f\n", t);
            return 0;
        }
        close(s);
        usleep(10 * 1000);
    }
    return 1;
}

static void usage(void)
{
    fputs("usage: nbd-verify run --device PATH [--region-mib N] [--stop-file PATH] [--events PATH] [--status PATH]\n"
          "                      [--seed N] [--reopen-on-error] [--gap-ms N] [--map-out PATH] [--final-retry-s N]\n"
          "       nbd-verify check --device PATH --map PATH [--events PATH]\n"
          "       nbd-verify now\n"
          "       nbd-verify waitport PORT TIMEOUT_S\n", stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2) usage();
    const char *verb = argv[1];
    if (strcmp(verb, "now") == 0) { printf("%.6f\n", now_real()); return 0; }
    if (strcmp(verb, "waitport") == 0) {
        if (argc != 4) usage();
        return waitport(atoi(argv[2]), atof(argv[3]));
    }
    if (strcmp(verb, "run") != 0 && strcmp(verb, "check") != 0) usage();
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--reopen-on-error") == 0) { opt.reopen = 1; continue; }
        if (!v) usage();
        i++;
        if (strcmp(a, "--device") == 0) opt.device = v;
        else if (strcmp(a, "--region-mib") == 0) {
            long mib = atol(v);
            if (mib < 1 || mib > 4096) usage();
            opt.blocks = (uint32_t)(((uint64_t)mib << 20) / BLOCK);
        }
        else if (strcmp(a, "--stop-file") == 0) opt.stop_file = v;
        else if (strcmp(a, "--events") == 0) opt.events_path = v;
        else if (strcmp(a, "--status") == 0) opt.status_path = v;
        else if (strcmp(a, "--map-out") == 0) opt.map_out = v;
        else if (strcmp(a, "--map") == 0) opt.map_in = v;
        else if (strcmp(a, "--seed") == 0) opt.seed = strtoull(v, NULL, 10);
        else if (strcmp(a, "--gap-ms") == 0) opt.gap_ms = atol(v);
        else if (strcmp(a, "--final-retry-s") == 0) opt.final_retry_s = atof(v);
        else usage();
    }
    if (!opt.device) usage();
    struct sigaction sa = { .sa_handler = on_stop };
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* a write past RLIMIT_FSIZE must fail with EFBIG (the host self-test's I/O error), not kill us */
    signal(SIGXFSZ, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    if (strcmp(verb, "check") == 0) {
        if (!opt.map_in) usage();
        return check();
    }
    return run();
}
