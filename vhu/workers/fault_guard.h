/* Fault attribution for worker processes (vhu/workers/_guard.pyx).
 *
 * A worker touches guest memory that a front-end can pull from under it
 * (ftruncate of a memfd it shared: the next access is SIGBUS). The worker
 * cannot survive that, but it can say which port did it: this handler looks
 * the faulting address up in the table of guest mappings and writes
 * (signal, address, port + 1) into the worker's slot of shared memory, where
 * the master reads it after the worker died. Then it restores the default
 * action and returns: the access faults again and the process dies of the
 * same signal, as it would have without us.
 *
 * Async-signal-safe by construction: plain loads of a static table, plain
 * stores to shared memory, signal(2). The table is only rewritten by the
 * worker's own thread between engine runs, never while guest memory is being
 * touched, so the handler cannot see it half-written: the count is stored
 * last (release) and read first (acquire).
 */
#ifndef VHU_FAULT_GUARD_H
#define VHU_FAULT_GUARD_H

#include <signal.h>
#include <stdint.h>
#include <string.h>

#define VHU_FAULT_MAX_RANGES 2048

typedef struct {
    uintptr_t start;
    uintptr_t end;            /* exclusive */
    int64_t port;
} vhu_fault_range;

static vhu_fault_range vhu_fault_ranges[VHU_FAULT_MAX_RANGES];
static int vhu_fault_nranges;
static volatile uint64_t *vhu_fault_slot;   /* [0] signal, [1] address, [2] port + 1 (0: none) */
static char vhu_fault_altstack[1 << 16];    /* the handler runs even if the stack is the fault */

static void vhu_fault_handler(int sig, siginfo_t *si, void *ctx)
{
    uintptr_t addr = (uintptr_t)si->si_addr;
    int64_t port = -1;
    int i, n = __atomic_load_n(&vhu_fault_nranges, __ATOMIC_ACQUIRE);
    (void)ctx;
    for (i = 0; i < n; i++) {
        if (addr >= vhu_fault_ranges[i].start && addr < vhu_fault_ranges[i].end) {
            port = vhu_fault_ranges[i].port;
            break;
        }
    }
    if (vhu_fault_slot != NULL) {
        vhu_fault_slot[1] = addr;
        vhu_fault_slot[2] = (uint64_t)(port + 1);
        __atomic_store_n(&vhu_fault_slot[0], (uint64_t)sig, __ATOMIC_RELEASE);
    }
    signal(sig, SIG_DFL);
}

static int vhu_fault_install(volatile uint64_t *slot)
{
    struct sigaction sa;
    stack_t ss;
    ss.ss_sp = vhu_fault_altstack;
    ss.ss_size = sizeof vhu_fault_altstack;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, NULL) != 0)
        return -1;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = vhu_fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    vhu_fault_slot = slot;
    if (sigaction(SIGBUS, &sa, NULL) != 0 || sigaction(SIGSEGV, &sa, NULL) != 0)
        return -1;
    return 0;
}

/* Replace the table (count 0 while it is rewritten). */
static void vhu_fault_begin(void) { __atomic_store_n(&vhu_fault_nranges, 0, __ATOMIC_RELEASE); }
static int vhu_fault_add(uintptr_t start, uintptr_t length, int64_t port, int i)
{
    if (i >= VHU_FAULT_MAX_RANGES)
        return -1;
    vhu_fault_ranges[i].start = start;
    vhu_fault_ranges[i].end = start + length;
    vhu_fault_ranges[i].port = port;
    return 0;
}
static void vhu_fault_commit(int n) { __atomic_store_n(&vhu_fault_nranges, n, __ATOMIC_RELEASE); }

#endif
