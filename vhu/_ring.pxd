# Split virtqueue core: declarations for modules that drive rings from
# nogil code (workers, the front-end, benchmarks).
cimport cython
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from vhu._mem cimport GuestMemory, MemTable

cdef enum:
    DESC_F_NEXT = 1
    DESC_F_WRITE = 2
    DESC_F_INDIRECT = 4
    RX_STASH = 32               # receive chains popped at a time by dev_rx_enqueue
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
    C_KICKS                 # kicks received (eventfd counts), counted by the worker engine
    C_DROP_FILTERED         # switch: destination is behind the in-port (never sent back)
    C_DROP_NO_PORT          # the chosen output port has no ready receive ring
    C_DROP_STAGE            # a pipeline stage's verdict was drop
    C_DROP_STAGE_ERROR      # a pipeline stage raised: its batch is dropped
    C_TX_TOO_BIG            # a chain whose frame is over MAX_FRAME_LEN: dropped, never delivered
    C_POSITION              # not a counter: the ring's published position (see dev_publish_used)
    C_BROKEN_FIRST          # one counter per Broken reason follows

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
    B_BAD_ID                # packed: buffer id >= queue size
    B_CHAIN_NOT_AVAILABLE   # packed: a chain continues into a descriptor not made available
    B_INDIRECT_IN_CHAIN     # packed: an indirect descriptor inside a NEXT chain
    B_MEMORY_FAULT          # the port's memory faulted a worker (set by the master)
    B_KICK_FD_ERROR         # the kick fd reported an error or hang-up
    B_COUNT

# Offload counters follow the Broken ones (vhu.workers._offload).
cdef enum:
    C_TX_BAD_OFFLOAD = C_BROKEN_FIRST + B_COUNT   # a virtio_net_hdr not honoured: dropped
    C_TX_GSO                # TSO frames from the guest (one per large frame)
    C_TX_CSUM               # frames from the guest with a partial checksum (NEEDS_CSUM, no GSO)
    C_RX_GSO                # TSO frames put into the guest as they are (GUEST_TSO4/6)
    C_RX_CSUM               # partial-checksum frames put into the guest as they are (GUEST_CSUM)
    C_RX_SEGMENTED          # TSO frames vhu segmented for the guest (each segment is an rx_frame)
    C_RX_CSUM_DONE          # partial checksums vhu finished for the guest
    C_OFFLOAD_END

cdef enum:
    # Dirty-log bits set for a migration (vhu/_ring_log.pxi): a page counts
    # once per batch that wrote it. After the offload counters: appended.
    C_LOG_PAGES = C_OFFLOAD_END

# VXLAN port counters (vhu/workers/_vxlan.pxi), appended after the log's.
cdef enum:
    C_VXLAN_BAD = C_LOG_PAGES + 1  # VXLAN: a datagram with a bad header, VNI or size
    C_VXLAN_FOREIGN         # VXLAN: a datagram from an address not in the remote list
    C_VXLAN_TOO_BIG         # VXLAN: an inner frame over the underlay MTU (never fragmented)
    C_APPENDED_END

# Cross-worker RX rings (vhu/workers/_shared.pxi), appended last.
cdef enum:
    C_RX_CONTENDED = C_APPENDED_END   # RX batches another worker's lock held back
    C_RX_LOCK       # not a counter: the RX ring's cross-worker lock (vhu/workers/_shared.pxi)
    C_RX_EPOCH      # not a counter: which start of the ring the shared position belongs to
    C_COUNT

cdef enum:
    # virtio-net's largest frame (also TSO's): an Ethernet frame, without the
    # virtio-net header, is at most 65535 bytes. A chain that carries more is
    # dropped (C_TX_TOO_BIG); the device never builds or delivers a bigger one.
    MAX_FRAME_LEN = 65535

cdef struct Seg:
    char *ptr
    uint32_t len

cdef struct ChainInfo:
    uint32_t seg_start      # first segment in the ring's segment array
    uint32_t nread          # readable segments, then nwrite writable ones
    uint32_t nwrite
    uint16_t head           # split: head index; packed: buffer id
    uint16_t ndesc          # ring descriptors the chain takes (packed: used-slot skip)
    uint16_t pos            # packed: ring position of the chain's first descriptor ...
    uint16_t wrap           # ... and the driver wrap counter there
    uint64_t read_len
    uint64_t write_len

cdef class Chain:
    cdef readonly int head
    cdef readonly list readable
    cdef readonly list writable
    cdef readonly object read_len
    cdef readonly object write_len

cdef struct DevRing:
    # Device side of one split ring. Pointers into guest memory are valid
    # while mem_generation equals *generation_ref (checked before each batch).
    MemTable **table_ref                 # &GuestMemory.table of the owner
    unsigned long long *generation_ref   # &GuestMemory.generation
    unsigned long long mem_generation
    uint32_t size
    uint16_t mask
    bint event_idx
    bint indirect
    bint device_reads              # a transmit queue: the device only reads its buffers
    # VIRTIO_F_IN_ORDER on a packed transmit queue: a publish writes one used
    # descriptor for its whole batch (pk_publish_used).
    bint batch_used
    bint mergeable
    bint addr_uva
    uint32_t hdr_len
    uint64_t desc_addr, avail_addr, used_addr
    uint64_t part_len[3]                 # bytes of desc, avail, used (vhu.ring_layout)
    char *desc
    char *avail
    char *used
    uint16_t last_avail            # next avail entry to pop
    uint16_t shadow_used           # next used entry to write
    uint16_t published_used        # used->idx as last published
    bint notify_valid              # published_used is meaningful for EVENT_IDX
    int broken
    uint64_t *counters             # C_COUNT u64s: the owner's, or shared memory
    ChainInfo *chains              # batch scratch, filled by dev_pop_batch
    uint32_t max_chains
    Seg *segs
    uint32_t max_segs
    char *indirect_copy            # an indirect table that crosses regions, gathered
    uint32_t stash_n               # receive chains popped ahead into chains[] ...
    uint32_t stash_i               # ... and how many of them are used
    # Packed rings (virtio 1.1, 2.8): desc is the descriptor ring, avail the
    # driver event suppression area, used the device event suppression area;
    # last_avail / shadow_used are ring positions, with their wrap counters.
    bint packed
    uint16_t avail_wrap
    uint16_t used_wrap
    uint16_t *id_ndesc             # descriptors each in-flight buffer id took
    uint16_t *pend_id              # used elements not yet written to the ring
    uint32_t *pend_len
    uint32_t npend
    # Dirty-page logging (vhost-user "Migration", _ring_log.pxi). log is NULL
    # unless LOG_ALL is on and a log is mapped: then every pop collects the
    # pages its writable buffers lie in, and every publish marks them (and
    # the used-ring writes) in the log, once per batch.
    uint8_t *log
    uint64_t log_size                # bytes of the bitmap (4 KiB guest-physical page a bit)
    bint log_used                    # VHOST_VRING_F_LOG: used-ring writes logged ...
    uint64_t log_used_gpa            # ... at log_guest_addr
    uint64_t *dirty                  # pages collected since the last publish
    uint32_t ndirty
    uint32_t max_dirty
    bint dirty_all                   # more than max_dirty: every mapped page is marked
    uint64_t last_page               # the page collected last (consecutive repeats skipped)
    int log_hit                      # region the last host-to-gpa lookup found

cdef struct DrvRing:
    MemTable **table_ref           # as in DevRing: re-translate after a table change
    unsigned long long *generation_ref
    unsigned long long mem_generation
    uint32_t size
    uint16_t mask
    bint event_idx
    uint64_t desc_gpa, avail_gpa, used_gpa
    uint64_t part_len[3]           # as in DevRing
    char *desc
    char *avail
    char *used
    uint16_t shadow_avail          # next avail entry to write
    uint16_t published_avail
    uint16_t last_used             # next used entry to read
    uint16_t *free_next            # free list kept outside guest memory
    uint16_t *chain_len            # descriptors each head holds; 0: not in flight
    uint32_t free_head
    uint32_t num_free
    bint packed                    # packed: shadow_avail / last_used are positions
    uint16_t avail_wrap
    uint16_t used_wrap
    uint16_t *pend_pos             # descriptors written, flags not yet
    uint16_t *pend_flags
    uint32_t npend
    # VIRTIO_F_IN_ORDER: chains in the order they were made available, so a
    # used entry naming a later chain returns every chain before it too.
    bint in_order
    uint16_t *order                # FIFO of in-flight heads / buffer ids
    uint32_t order_head
    uint32_t order_count
    bint draining                  # returning chains up to drain_id
    uint16_t drain_id
    uint32_t drain_len

@cython.final
cdef class DeviceRing:
    cdef DevRing r
    cdef GuestMemory mem
    cdef uint64_t own_counters[C_COUNT]
    cdef object counters_owner
    cdef object log_owner
    cdef DevRing *ring(self)
    cdef Chain _chain_object(self, ChainInfo *c)

@cython.final
cdef class DriverRing:
    cdef DrvRing r
    cdef GuestMemory mem
    cdef DrvRing *ring(self)

# Device side, for compiled loops (no GIL).
cdef int translate_ring(MemTable *t, bint uva, uint64_t desc_addr, uint64_t avail_addr,
                        uint64_t used_addr, const uint64_t *part_len,
                        char **d, char **a, char **u) noexcept nogil
cdef bint dev_mem_ok(DevRing *r) noexcept nogil
cdef bint drv_mem_ok(DrvRing *r) noexcept nogil
cdef int dev_mark_broken(DevRing *r, int reason) noexcept nogil
cdef int dev_avail_pending(DevRing *r) noexcept nogil
cdef int dev_walk_chain(DevRing *r, uint16_t head, ChainInfo *c, uint32_t seg_base) noexcept nogil
cdef int dev_pop_batch(DevRing *r, uint32_t max_chains) noexcept nogil
cdef int pop_chains(DevRing *r, uint32_t max_chains) noexcept nogil
cdef void dev_unpop_stash(DevRing *r) noexcept nogil
cdef void dev_push_used(DevRing *r, uint16_t head, uint32_t written) noexcept nogil
cdef void dev_push_popped(DevRing *r, uint32_t n) noexcept nogil
cdef bint dev_publish_used(DevRing *r) noexcept nogil
cdef void dev_notifications_off(DevRing *r) noexcept nogil
cdef bint dev_notifications_on(DevRing *r) noexcept nogil
cdef int dev_rx_enqueue(DevRing *r, const Seg *src, uint32_t nsrc, uint64_t skip,
                        uint64_t frame_len) noexcept nogil
cdef int dev_rx_enqueue_hdr(DevRing *r, const uint8_t *vnet_hdr, const Seg *src, uint32_t nsrc,
                            uint64_t skip, uint64_t frame_len) noexcept nogil

# Driver side. drv_add_one does not re-check the memory table: call
# drv_mem_ok once per batch first (publish and reclaim check it themselves).
cdef void drv_make_available(DrvRing *r, uint16_t head, uint16_t ndesc) noexcept nogil
cdef int drv_add_one(DrvRing *r, uint64_t gpa, uint32_t length, uint16_t flags) noexcept nogil
cdef uint32_t drv_add_slots(DrvRing *r, uint64_t base_gpa, uint32_t slot_bytes, uint32_t length,
                            uint16_t flags, uint32_t max_chains) noexcept nogil
cdef bint drv_publish_avail(DrvRing *r) noexcept nogil
cdef int drv_reclaim(DrvRing *r, uint16_t *heads, uint32_t *lens, int max_items) noexcept nogil
cdef void drv_interrupts_off(DrvRing *r) noexcept nogil
cdef bint drv_interrupts_on(DrvRing *r) noexcept nogil

cdef int copy_segs(const Seg *dst, uint32_t ndst, uint64_t dst_off,
                   const Seg *src, uint32_t nsrc, uint64_t src_off,
                   uint64_t nbytes) noexcept nogil
