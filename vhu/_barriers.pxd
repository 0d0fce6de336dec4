# Declarations of vhu_barriers.h: ordering and little-endian access helpers.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "vhu_barriers.h" nogil:
    uint16_t vhu_load_acquire_u16(const void *p)
    void vhu_store_release_u16(void *p, uint16_t v)
    void vhu_fence_full()
    uint16_t vhu_read_once_u16(const void *p)
    uint32_t vhu_read_once_u32(const void *p)
    uint64_t vhu_read_once_u64(const void *p)
    void vhu_write_once_u16(void *p, uint16_t v)
    void vhu_write_once_u32(void *p, uint32_t v)
    void vhu_write_once_u64(void *p, uint64_t v)
    void vhu_prefetch(const void *p)
    void vhu_fence_release()
    void vhu_log_or_u8(void *p, uint8_t bits)
    bint vhu_likely(bint x)
    bint vhu_unlikely(bint x)
    void VHU_ASSERT(bint cond)
    int VHU_DEBUG_BUILD
    # vhu's own shared words (not guest memory): host byte order
    bint vhu_cas_acquire_u64(uint64_t *p, uint64_t *expect, uint64_t v)
    bint vhu_cas_relaxed_u64(uint64_t *p, uint64_t *expect, uint64_t v)
    void vhu_store_release_u64(uint64_t *p, uint64_t v)
    uint64_t vhu_load_acquire_u64(const uint64_t *p)
    void vhu_atomic_add_u64(uint64_t *p, uint64_t n)
