/* A cheap, monotonic tick count for the worker's busy/idle accounting
 * (Engine.run reads it once a polling round). Only ratios of ticks are ever
 * reported (busy ticks over polling ticks), so the unit does not matter:
 * the time-stamp counter on x86-64 (constant-rate on every CPU this runs on
 * that has an invariant TSC), the virtual counter on arm64, nanoseconds of
 * CLOCK_MONOTONIC elsewhere. */
#ifndef VHU_POLL_TICKS_H
#define VHU_POLL_TICKS_H
#include <stdint.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
static inline uint64_t vhu_poll_ticks(void) { return __rdtsc(); }
#elif defined(__aarch64__)
static inline uint64_t vhu_poll_ticks(void)
{
    uint64_t v;
    __asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(v));
    return v;
}
#else
static inline uint64_t vhu_poll_ticks(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#endif
#endif
