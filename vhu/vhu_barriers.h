/*
 * Memory ordering and little-endian access for rings shared with another
 * process (virtio 1.x section 2.7.7 and 2.7.13; the driver may run on any CPU).
 * One helper per intent, so every ordering decision in _ring.pyx is named.
 */
#ifndef VHU_BARRIERS_H
#define VHU_BARRIERS_H

#include <stdint.h>
#include <string.h>
#include <endian.h>

/* Read an index the other side publishes: later reads of the entries it
 * covers must not be satisfied before this load (avail->idx, used->idx). */
static inline uint16_t vhu_load_acquire_u16(const void *p) {
    return le16toh(__atomic_load_n((const uint16_t *)p, __ATOMIC_ACQUIRE));
}

/* Publish an index: all entry writes before it are visible first
 * (used->idx by the device, avail->idx by the driver). */
static inline void vhu_store_release_u16(void *p, uint16_t v) {
    __atomic_store_n((uint16_t *)p, htole16(v), __ATOMIC_RELEASE);
}

/* Between publishing our index (or re-enabling notifications) and reading
 * the peer's event index or flags: a store-load ordering, which only a full
 * fence gives, or a kick/interrupt can be lost. */
static inline void vhu_fence_full(void) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}

/* Plain reads of fields the other side may change at any time: read once,
 * through a volatile access, so the compiler cannot re-read a value we checked. */
static inline uint16_t vhu_read_once_u16(const void *p) {
    return le16toh(*(const volatile uint16_t *)p);
}
static inline uint32_t vhu_read_once_u32(const void *p) {
    return le32toh(*(const volatile uint32_t *)p);
}
static inline uint64_t vhu_read_once_u64(const void *p) {
    return le64toh(*(const volatile uint64_t *)p);
}
static inline void vhu_write_once_u16(void *p, uint16_t v) {
    *(volatile uint16_t *)p = htole16(v);
}
static inline void vhu_write_once_u32(void *p, uint32_t v) {
    *(volatile uint32_t *)p = htole32(v);
}
static inline void vhu_write_once_u64(void *p, uint64_t v) {
    *(volatile uint64_t *)p = htole64(v);
}

/* Dirty-page log (vhost-user "Migration"): the front-end clears bits while
 * we set them, so each bit is set with an atomic OR (as DPDK's
 * vhost_log_page). The release fence goes once before a batch of ORs: the
 * guest-memory writes the bits stand for are visible before any of them,
 * or the front-end could copy a page, clear its bit, and miss our write. */
static inline void vhu_fence_release(void) {
    __atomic_thread_fence(__ATOMIC_RELEASE);
}
static inline void vhu_log_or_u8(void *p, uint8_t bits) {
    __atomic_fetch_or((uint8_t *)p, bits, __ATOMIC_RELAXED);
}

/* Hint the next cache line of a ring entry in: the peer wrote it last. */
static inline void vhu_prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }

#define vhu_likely(x) __builtin_expect(!!(x), 1)
#define vhu_unlikely(x) __builtin_expect(!!(x), 0)

/* VHU_DEBUG=1 at build time turns these into real checks. */
#ifdef VHU_DEBUG
#include <stdio.h>
#include <stdlib.h>
#define VHU_ASSERT(cond) do { if (!(cond)) { \
    fprintf(stderr, "vhu: assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
    abort(); } } while (0)
#define VHU_DEBUG_BUILD 1
#else
#define VHU_ASSERT(cond) ((void)0)
#define VHU_DEBUG_BUILD 0
#endif

/* Words shared between vhu's own processes (workers, master), never with a
 * guest: host byte order. Used for the cross-worker RX-ring lock and the
 * shared MAC table (vhu/workers/_shared.pxi). */

/* Take a lock word: compare-and-swap *expect -> v; on success, everything
 * the previous holder wrote before its release is visible (acquire). On
 * failure *expect holds the word's current value. */
static inline int vhu_cas_acquire_u64(uint64_t *p, uint64_t *expect, uint64_t v) {
    return __atomic_compare_exchange_n(p, expect, v, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}
/* Replace a shared table word only if nobody changed it meanwhile; no
 * ordering beyond the word itself. */
static inline int vhu_cas_relaxed_u64(uint64_t *p, uint64_t *expect, uint64_t v) {
    return __atomic_compare_exchange_n(p, expect, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED);
}
/* Give a lock word back: every write of the critical section is visible
 * before the word reads free. */
static inline void vhu_store_release_u64(uint64_t *p, uint64_t v) {
    __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
static inline uint64_t vhu_load_acquire_u64(const uint64_t *p) {
    return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
/* A counter that more than one worker bumps outside any lock. */
static inline void vhu_atomic_add_u64(uint64_t *p, uint64_t n) {
    __atomic_fetch_add(p, n, __ATOMIC_RELAXED);
}

#endif
