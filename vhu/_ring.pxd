# Split virtqueue core: declarations for modules that drive rings from
# nogil code (workers, the front-end, benchmarks).
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from vhu._mem cimport GuestMemory, MemTable

cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    USED_F_NO_NOTIFY = 1        # used->flags: device asks for no kicks
    AVAIL_F_NO_INTERRUPT = 1    # avail->flags: driver asks for no interrupts

# Counters, one table: index here, name in COUNTER_NAMES (same order).
cdef enum:  # Counter
    C_POPPED
    C_PUSHED
    C_PUBLISHED
    C_NOTIFY
    C_NOTIFY_SUPPRESSED
    C_RX_FRAMES
    C_RX_BYTES
    C_RX_NO_ROOM
    C_RX_TOO_BIG
    C_TX_FRAMES
    C_TX_BYTES
    C_TX_SHORT
    C_BROKEN_FIRST          # one counter per Broken reason follows
    C_COUNT = C_BROKEN_FIRST + 13

cdef enum:  # Broken
    B_OK = 0
    B_HEAD_OUT_OF_RANGE
    B_NEXT_OUT_OF_RANGE
    B_CHAIN_TOO_LONG
    B_INDIRECT_BAD_LEN
    B_INDIRECT_NESTED
    B_INDIRECT_UNMAPPED
    B_INDIRECT_NOT_NEGOTIATED
    B_BUFFER_UNMAPPED
    B_AVAIL_IDX_JUMP
    B_READABLE_AFTER_WRITABLE
    B_RING_UNMAPPED
    B_TOO_MANY_SEGMENTS
    B_COUNT

cdef struct Seg:
    char *ptr
    uint32_t len

cdef struct ChainInfo:
    uint32_t seg_start      # first segment in the ring's segment array
    uint16_t head
    uint16_t nread          # readable segments, then nwrite writable ones
    uint32_t nwrite
    uint64_t read_len
    uint64_t write_len

cdef class Chain:
    cdef readonly int head
    cdef readonly list readable
    cdef readonly list writable
    cdef readonly object read_len
    cdef readonly object write_len

@cython.final
cdef class DeviceRing:
    cdef GuestMemory mem
    cdef readonly uint32_t size
    cdef uint16_t mask
    cdef readonly bint event_idx
    cdef readonly bint indirect
    cdef readonly bint mergeable
    cdef readonly uint32_t hdr_len
    cdef bint addr_uva
    cdef uint64_t desc_addr, avail_addr, used_addr
    cdef unsigned long long mem_generation
    cdef char *desc
    cdef char *avail
    cdef char *used
    cdef uint16_t last_avail            # next avail entry to pop
    cdef uint16_t shadow_used           # next used entry to write
    cdef uint16_t published_used        # used->idx as last published
    cdef bint notify_valid              # published_used is meaningful for EVENT_IDX
    cdef int broken
    cdef uint64_t own_counters[C_COUNT]
    cdef uint64_t *counters             # own_counters, or shared memory
    # batch scratch: filled by pop_batch
    cdef ChainInfo *chains
    cdef uint32_t max_chains
    cdef Seg *segs
    cdef uint32_t max_segs

    cdef int _translate(self) except -1
    cdef bint mem_ok(self) noexcept nogil
    cdef int mark_broken(self, int reason) noexcept nogil
    cdef int avail_pending(self) noexcept nogil
    cdef int walk_chain(self, uint16_t head, ChainInfo *c, uint32_t seg_base) noexcept nogil
    cdef int pop_batch(self, uint32_t max_chains) noexcept nogil
    cdef void push_used(self, uint16_t head, uint32_t written) noexcept nogil
    cdef bint publish_used(self) noexcept nogil
    cdef void notifications_off(self) noexcept nogil
    cdef bint notifications_on(self) noexcept nogil
    cdef Chain _chain_object(self, ChainInfo *c)
    cdef int rx_enqueue(self, const Seg *src, uint32_t nsrc, uint64_t skip, uint64_t frame_len) noexcept nogil

@cython.final
cdef class DriverRing:
    cdef GuestMemory mem
    cdef readonly uint32_t size
    cdef uint16_t mask
    cdef readonly bint event_idx
    cdef uint64_t desc_gpa, avail_gpa, used_gpa
    cdef unsigned long long mem_generation
    cdef char *desc
    cdef char *avail
    cdef char *used
    cdef uint16_t shadow_avail          # next avail entry to write
    cdef uint16_t published_avail
    cdef uint16_t last_used             # next used entry to read
    cdef uint16_t *free_next            # free list kept outside guest memory
    cdef uint16_t *chain_len            # descriptors each in-flight head holds
    cdef uint8_t *in_flight
    cdef uint32_t free_head
    cdef uint32_t num_free

    cdef int _translate(self) except -1
    cdef void _write_desc(self, char *d, uint64_t gpa, uint32_t length, uint16_t flags,
                          uint16_t nxt) noexcept nogil
    cdef void _make_available(self, uint16_t head, uint16_t ndesc) noexcept nogil
    cdef int add_one(self, uint64_t gpa, uint32_t length, uint16_t flags) noexcept nogil
    cdef bint publish_avail(self) noexcept nogil
    cdef int reclaim(self, uint16_t *heads, uint32_t *lens, int max_items) noexcept nogil

cdef int copy_segs(const Seg *dst, uint32_t ndst, uint64_t dst_off,
                   const Seg *src, uint32_t nsrc, uint64_t src_off,
                   uint64_t nbytes) noexcept nogil
