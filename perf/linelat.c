/* The round trip of one cache line between two CPUs: two threads, pinned,
 * hand a counter back and forth through one line. perf/race.py runs it
 * before and after every run: on a shared virtual machine the hypervisor
 * places the two vCPUs close (a shared cache) or far apart, and the rate of
 * every ring-bound row follows that placement.
 *
 *     cc -O2 -pthread -o linelat perf/linelat.c && ./linelat CPU_A CPU_B [ROUND_TRIPS]
 *
 * Prints the mean nanoseconds per round trip. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Alignas(64) _Atomic long line;   /* the one line both threads write */
static long round_trips;

static int pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *answer(void *arg)
{
    if (pin(*(int *)arg) != 0)
        exit(2);
    for (long i = 0; i < round_trips; i++) {
        while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 1)
            ;
        atomic_store_explicit(&line, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s CPU_A CPU_B [ROUND_TRIPS]\n", argv[0]);
        return 2;
    }
    int a = atoi(argv[1]), b = atoi(argv[2]);
    round_trips = argc > 3 ? atol(argv[3]) : 100000;
    if (pin(a) != 0)
        return 2;
    pthread_t t;
    struct timespec t0, t1;
    pthread_create(&t, NULL, answer, &b);
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (long i = 0; i < round_trips; i++) {
        atomic_store_explicit(&line, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&line, memory_order_acquire) != 2 * i + 2)
            ;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    pthread_join(t, NULL);
    printf("%.1f\n", ((t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec)) / round_trips);
    return 0;
}
