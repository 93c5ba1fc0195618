/*
 * thread-signal: sends signals to one thread of a process (tgkill(2)), which kill(1) cannot do: kill(2) on any id of
 * a thread group is a signal to the whole group, and the kernel picks the thread that takes it. Built static for the
 * busybox VM.
 *
 *   thread-signal PID THREAD SIGNAL...
 *
 * THREAD is a thread id (all digits; e.g. the one /sys/block/nbdN/pid names) or a name prefix. Sends each SIGNAL (a
 * number) to that thread, or to every thread of PID whose name (/proc/PID/task/TID/comm) starts with the prefix,
 * 50 ms apart, and prints one line per thread: "tid=TID comm=NAME sent=S1,S2,...". Exit 0 if at least one thread was
 * found and every tgkill succeeded, 1 otherwise, 2 on bad arguments.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static int read_comm(const char *pid, const char *tid, char *out, size_t size)
{
    char path[600];
    snprintf(path, sizeof path, "/proc/%s/task/%s/comm", pid, tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    if (!fgets(out, (int)size, f)) {
        fclose(f);
        return -1;
    }
    fclose(f);
    out[strcspn(out, "\n")] = '\0';
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: thread-signal PID THREAD SIGNAL...\n");
        return 2;
    }
    char *end;
    long pid = strtol(argv[1], &end, 10);
    if (*end || pid <= 0) {
        fprintf(stderr, "thread-signal: bad PID '%s'\n", argv[1]);
        return 2;
    }
    for (int i = 3; i < argc; i++) {
        long sig = strtol(argv[i], &end, 10);
        if (*end || sig <= 0 || sig > 64) {
            fprintf(stderr, "thread-signal: bad signal number '%s'\n", argv[i]);
            return 2;
        }
    }

    const char *thread = argv[2];
    int by_id = thread[0] != '\0' && strspn(thread, "0123456789") == strlen(thread);

    char dir[64];
    snprintf(dir, sizeof dir, "/proc/%ld/task", pid);
    DIR *tasks = opendir(dir);
    if (!tasks) {
        fprintf(stderr, "thread-signal: %s: %s\n", dir, strerror(errno));
        return 1;
    }
    int found = 0, failed = 0;
    struct dirent *entry;
    while ((entry = readdir(tasks))) {
        if (entry->d_name[0] < '0' || entry->d_name[0] > '9')
            continue;
        char comm[64];
        if (read_comm(argv[1], entry->d_name, comm, sizeof comm) != 0)
            continue;
        if (by_id ? strcmp(entry->d_name, thread) != 0 : strncmp(comm, thread, strlen(thread)) != 0)
            continue;
        found++;
        long tid = strtol(entry->d_name, NULL, 10);
        printf("tid=%ld comm=", tid);
        for (char *c = comm; *c; c++)
            putchar(*c == ' ' ? '_' : *c);
        printf(" sent=");
        for (int i = 3; i < argc; i++) {
            long sig = strtol(argv[i], NULL, 10);
            if (syscall(SYS_tgkill, pid, tid, (int)sig) != 0) {
                fprintf(stderr, "thread-signal: tgkill(%ld, %ld, %ld): %s\n", pid, tid, sig, strerror(errno));
                failed++;
                continue;
            }
            printf("%s%ld", i > 3 ? "," : "", sig);
            struct timespec pause = {0, 50 * 1000 * 1000};
            nanosleep(&pause, NULL);
        }
        printf("\n");
    }
    closedir(tasks);
    if (!found)
        fprintf(stderr, "thread-signal: no thread of %ld %s '%s'\n", pid, by_id ? "with id" : "named", thread);
    return found && !failed ? 0 : 1;
}
