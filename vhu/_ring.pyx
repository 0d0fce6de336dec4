# cython: language_level=3
"""Split virtqueues (virtio 1.x section 2.7), device side and driver side.

Pure logic over guest memory: no sockets, no eventfds, no epoll. Callers
get "notify?" / "kick?" answers and do the I/O themselves.

Trust model (device side): the driver is another process, possibly
hostile, writing the same memory while we read it. Every index, descriptor
field, address and length is read once (vhu_read_once_*), checked, and only
then used. Any violation marks this ring broken: it stops being processed,
the reason is kept and counted, nothing outside the translated guest
buffers is read or written, and other rings are untouched.

Ordering (vhu_barriers.h): avail->idx is loaded with acquire so the ring
entries it covers are read after it; used->idx is stored with release so
the used entries are visible before it; a full fence separates publishing
an index (or re-enabling notifications) from reading the peer's event
index or flags, the store-load pair that would otherwise lose a wake-up.
"""
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset
from vhu._barriers cimport *
from vhu._mem cimport GuestMemory, MemTable, Region, gpa_clip, gpa_to_ptr, uva_to_ptr, make_view
from vhu.ring_layout import MAX_QUEUE_SIZE, MisalignedRing, check_alignment, part_lengths

__all__ = ["DeviceRing", "DriverRing", "Chain", "RingError", "net_header_len",
           "check_queue_size", "split_ring_layout", "COUNTER_NAMES"]

NET_HDR_LEN_LEGACY = 10
NET_HDR_LEN_MRG = 12
VIRTQ_DESC_F_NEXT = DESC_F_NEXT
VIRTQ_DESC_F_WRITE = DESC_F_WRITE
VIRTQ_DESC_F_INDIRECT = DESC_F_INDIRECT
VRING_USED_F_NO_NOTIFY = USED_F_NO_NOTIFY
VRING_AVAIL_F_NO_INTERRUPT = AVAIL_F_NO_INTERRUPT
DEBUG_BUILD = bool(VHU_DEBUG_BUILD)

cdef uint64_t F_MRG_RXBUF = 1ULL << 15
cdef uint64_t F_VERSION_1 = 1ULL << 32
cdef uint64_t F_IN_ORDER = 1ULL << 35

# Broken reasons: code -> (constant name, text). Order matches enum Broken.
_BROKEN = [
    (None, None),
    ("HEAD_OUT_OF_RANGE", "head index >= queue size"),
    ("NEXT_OUT_OF_RANGE", "next index >= queue size"),
    ("CHAIN_TOO_LONG", "descriptor chain longer than the queue (loop?)"),
    ("INDIRECT_BAD_LEN", "indirect table length not a non-zero multiple of 16"),
    ("INDIRECT_NESTED", "indirect descriptor inside an indirect table"),
    ("INDIRECT_UNMAPPED", "indirect table outside guest memory"),
    ("INDIRECT_NOT_NEGOTIATED", "indirect descriptor without VIRTIO_F_INDIRECT_DESC"),
    ("BUFFER_UNMAPPED", "buffer outside guest memory"),
    ("AVAIL_IDX_JUMP", "avail idx moved by more than the queue size"),
    ("READABLE_AFTER_WRITABLE", "device-readable descriptor after a device-writable one"),
    ("RING_UNMAPPED", "ring no longer inside guest memory after a memory table change"),
    ("TOO_MANY_SEGMENTS", "chain split into more segments than the device can hold"),
    ("BAD_ID", "buffer id >= queue size"),
    ("CHAIN_NOT_AVAILABLE", "chain continues into a descriptor that is not available"),
    ("INDIRECT_IN_CHAIN", "indirect descriptor inside a chain of descriptors"),
    ("MEMORY_FAULT", "the front-end's memory faulted the worker (shrunk or unmapped under it)"),
    ("KICK_FD_ERROR", "the kick fd reported an error or hang-up"),
]
assert len(_BROKEN) == B_COUNT
for _name, _text in _BROKEN[1:]:
    globals()["BROKEN_" + _name] = _text

# The counter table (enum Counter order): the single source of stats names.
COUNTER_NAMES = (["popped", "pushed", "published", "notify", "notify_suppressed",
                  "rx_frames", "rx_bytes", "rx_no_room", "rx_too_big",
                  "tx_frames", "tx_bytes", "tx_short", "kicks", "drop_filtered",
                  "drop_no_port", "drop_stage", "drop_stage_error", "tx_too_big", "state_position",
                  "broken_ok_unused"]
                 + ["broken_" + n.lower() for n, _ in _BROKEN[1:]]
                 + ["tx_bad_offload", "tx_gso", "tx_csum", "rx_gso", "rx_csum", "rx_segmented",
                    "rx_csum_done"]
                 + ["log_pages"]
                 + ["vxlan_bad", "vxlan_foreign", "vxlan_too_big"]
                 + ["rx_contended", "state_rx_lock", "state_rx_epoch"])
assert len(COUNTER_NAMES) == C_COUNT


class RingError(ValueError):
    """A ring that cannot be set up (bad size, unmapped or misaligned ring address)."""


def net_header_len(features):
    """12 with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF, else the legacy 10."""
    return NET_HDR_LEN_MRG if int(features) & (F_VERSION_1 | F_MRG_RXBUF) else NET_HDR_LEN_LEGACY


def check_queue_size(size, packed=False):
    """Split rings: a power of two from 1 to 32768. Packed rings (2.8.10.1):
    any size from 1 to 32768."""
    size = int(size)
    if size < 1 or size > MAX_QUEUE_SIZE or (not packed and size & (size - 1)):
        raise RingError(f"queue size {size}: must be "
                        f"{'' if packed else 'a power of two '}from 1 to {MAX_QUEUE_SIZE}")


def packed_ring_layout(size):
    """Bytes of (descriptor ring, driver event area, device event area)."""
    check_queue_size(size, packed=True)
    return part_lengths(int(size), packed=True)


def split_ring_layout(size):
    """Bytes of (descriptor table, avail ring, used ring), event fields included."""
    check_queue_size(size)
    return part_lengths(int(size))


def _check_layout(desc, avail, used, packed):
    """vhu.ring_layout's alignment rule, as a RingError (out-of-spec but usable
    layouts are accepted; the protocol layer is the one that says so)."""
    try:
        check_alignment(int(desc), int(avail), int(used), bool(packed))
    except MisalignedRing as e:
        raise RingError(f"misaligned ring: {e}") from None


cdef int _set_part_len(uint64_t *part_len, size, packed) except -1:
    part_len[0], part_len[1], part_len[2] = part_lengths(int(size), bool(packed))
    return 0


# Split ring field offsets (virtio 1.x 2.7.5, 2.7.6, 2.7.8).
cdef enum:
    RING_FLAGS = 0
    RING_IDX = 2
    RING_ENTRIES = 4

cdef inline char *avail_entry(char *avail, uint16_t i) noexcept nogil:
    return avail + RING_ENTRIES + 2 * <uint32_t>i

cdef inline char *used_entry(char *used, uint16_t i) noexcept nogil:
    return used + RING_ENTRIES + 8 * <uint32_t>i


cdef inline bint need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx) noexcept nogil:
    # virtio 1.x 2.7.10: notify when the peer's event index lies in
    # [old, new) — the entries published since the last check. In 16-bit
    # arithmetic, new-event-1 < new-old says exactly that, wrap included:
    # both sides count back from new, event must be fewer steps back than old.
    return <uint16_t>(new_idx - event - 1) < <uint16_t>(new_idx - old_idx)


cdef struct RegionHit:
    # The region the last buffer was in, held in a pop loop's locals: the
    # buffers of a batch almost always share one, and gpa_clip's own
    # last-hit cache lives in the table, which every store into a chain or
    # segment forces the compiler to reload.
    uint64_t gpa
    uint64_t size
    char *host

cdef inline void hit_load(RegionHit *h, MemTable *t) noexcept nogil:
    if t.n:
        h.gpa = t.regions[t.last_hit].gpa
        h.size = t.regions[t.last_hit].size
        h.host = t.regions[t.last_hit].host
    else:
        h.gpa = h.size = 0      # matches nothing
        h.host = NULL

cdef inline char *hit_translate(RegionHit *h, MemTable *t, uint64_t addr, uint32_t dlen) noexcept nogil:
    """Local address of [addr, addr+dlen) when it lies in one region, else
    NULL (unmapped, or crossing a region edge: the caller's slow path)."""
    cdef uint64_t off = addr - h.gpa     # wraps huge when addr < h.gpa
    cdef char *p = NULL
    if vhu_likely(off < h.size and dlen <= h.size - off):
        return h.host + off
    if gpa_clip(t, addr, dlen, &p) != dlen:
        return NULL
    hit_load(h, t)
    return p


cdef int copy_segs(const Seg *dst, uint32_t ndst, uint64_t dst_off,
                   const Seg *src, uint32_t nsrc, uint64_t src_off,
                   uint64_t nbytes) noexcept nogil:
    """Copy nbytes from src segments (from src_off) to dst segments (from
    dst_off). Returns 0, or -1 if either side runs out (nothing is promised
    about what was copied then)."""
    cdef uint32_t di = 0, si = 0
    cdef uint64_t n
    while di < ndst and dst_off >= dst[di].len:
        dst_off -= dst[di].len
        di += 1
    while si < nsrc and src_off >= src[si].len:
        src_off -= src[si].len
        si += 1
    while nbytes:
        if di >= ndst or si >= nsrc:
            return -1
        n = dst[di].len - dst_off
        if src[si].len - src_off < n:
            n = src[si].len - src_off
        if nbytes < n:
            n = nbytes
        memcpy(dst[di].ptr + dst_off, src[si].ptr + src_off, n)
        nbytes -= n
        dst_off += n
        src_off += n
        if dst_off == dst[di].len:
            di += 1
            dst_off = 0
        if src_off == src[si].len:
            si += 1
            src_off = 0
    return 0


# -- device side: nogil functions over a DevRing -------------------------

cdef int gather(MemTable *t, uint64_t gpa, uint64_t length, char *dst) noexcept nogil:
    """Copy [gpa, gpa+length) of guest memory, across regions, into dst; -1 if unmapped."""
    cdef char *p = NULL
    cdef uint64_t n
    if gpa + length - 1 < gpa:
        return -1
    while length:
        n = gpa_clip(t, gpa, length, &p)
        if n == 0:
            return -1
        memcpy(dst, p, n)
        dst += n
        gpa += n
        length -= n
    return 0


cdef bint drv_mem_ok(DrvRing *r) noexcept nogil:
    # As dev_mem_ok, for the driver side.
    if vhu_likely(r.mem_generation == r.generation_ref[0]):
        return r.desc != NULL
    r.mem_generation = r.generation_ref[0]
    return translate_ring(r.table_ref[0], False, r.desc_gpa, r.avail_gpa, r.used_gpa,
                          r.part_len, &r.desc, &r.avail, &r.used) == 0


cdef bint dev_mem_ok(DevRing *r) noexcept nogil:
    # The table changed under us (SET_MEM_TABLE/ADD/REM): our ring pointers
    # may point into unmapped memory. Re-translate before touching the ring.
    if vhu_likely(r.mem_generation == r.generation_ref[0]):
        return r.desc != NULL
    r.mem_generation = r.generation_ref[0]
    if translate_ring(r.table_ref[0], r.addr_uva, r.desc_addr, r.avail_addr, r.used_addr,
                      r.part_len, &r.desc, &r.avail, &r.used) < 0:
        dev_mark_broken(r, B_RING_UNMAPPED)
        return False
    return True


cdef int dev_mark_broken(DevRing *r, int reason) noexcept nogil:
    if r.broken == B_OK:
        r.broken = reason
    r.counters[C_BROKEN_FIRST + reason] += 1
    return -1


cdef int dev_avail_pending(DevRing *r) noexcept nogil:
    """Chains available and not yet popped; -1 when the ring is broken."""
    cdef uint16_t avail_idx, n
    if r.packed:
        return pk_avail_pending(r)
    if r.broken or not dev_mem_ok(r):
        return -1
    # Acquire: the avail entries and descriptors it covers are read after it.
    avail_idx = vhu_load_acquire_u16(r.avail + RING_IDX)
    n = <uint16_t>(avail_idx - r.last_avail)
    if vhu_unlikely(n > r.size):
        return dev_mark_broken(r, B_AVAIL_IDX_JUMP)
    return n


cdef int add_buffer(DevRing *r, ChainInfo *c, uint64_t addr, uint32_t dlen, bint writable,
                    bint *seen_writable, uint32_t *nseg, uint32_t seg_base) noexcept nogil:
    """One descriptor's buffer into segments (split at region edges), checked
    whole against guest memory. 0, -1 (ring broken) or 1 (out of segment space)."""
    cdef uint64_t length = dlen, n
    cdef char *p = NULL
    if writable:
        seen_writable[0] = True
    elif vhu_unlikely(seen_writable[0]):
        return dev_mark_broken(r, B_READABLE_AFTER_WRITABLE)
    if length == 0:
        return 0
    if vhu_unlikely(addr + length - 1 < addr):
        return dev_mark_broken(r, B_BUFFER_UNMAPPED)
    if writable:
        c.write_len += length
    else:
        c.read_len += length
    while length:
        n = gpa_clip(r.table_ref[0], addr, length, &p)
        if vhu_unlikely(n == 0):
            return dev_mark_broken(r, B_BUFFER_UNMAPPED)
        if vhu_unlikely(nseg[0] >= r.max_segs):
            if seg_base == 0:
                return dev_mark_broken(r, B_TOO_MANY_SEGMENTS)
            return 1
        r.segs[nseg[0]].ptr = p
        r.segs[nseg[0]].len = <uint32_t>n
        nseg[0] += 1
        if writable:
            c.nwrite += 1
        else:
            c.nread += 1
        addr += n
        length -= n
    return 0


cdef int dev_walk_chain(DevRing *r, uint16_t head, ChainInfo *c, uint32_t seg_base) noexcept nogil:
    """Translate the chain at head into segments from seg_base.
    Returns 0, -1 (ring broken) or 1 (not enough segment space left)."""
    cdef char *table = r.desc
    cdef uint32_t table_size = r.size
    cdef uint32_t idx = head
    cdef int budget = r.size        # descriptors this chain may still use
    cdef bint in_indirect = False
    cdef bint seen_writable = False
    cdef uint32_t nseg = seg_base
    cdef uint64_t addr
    cdef uint32_t dlen
    cdef uint16_t flags, nxt
    cdef int rc
    cdef char *d
    c.head = head
    c.ndesc = 1
    c.seg_start = seg_base
    c.nread = 0
    c.nwrite = 0
    c.read_len = 0
    c.write_len = 0
    if vhu_unlikely(head >= r.size):
        return dev_mark_broken(r, B_HEAD_OUT_OF_RANGE)
    while True:
        budget -= 1
        if vhu_unlikely(budget < 0):
            return dev_mark_broken(r, B_CHAIN_TOO_LONG)
        d = table + 16 * idx
        addr = vhu_read_once_u64(d)
        dlen = vhu_read_once_u32(d + 8)
        flags = vhu_read_once_u16(d + 12)
        nxt = vhu_read_once_u16(d + 14)
        if vhu_unlikely(flags & DESC_F_INDIRECT):
            if not r.indirect:
                return dev_mark_broken(r, B_INDIRECT_NOT_NEGOTIATED)
            if in_indirect:
                return dev_mark_broken(r, B_INDIRECT_NESTED)
            if dlen == 0 or dlen % 16:
                return dev_mark_broken(r, B_INDIRECT_BAD_LEN)
            # The indirect descriptor itself is not a buffer: only the
            # table's entries count against the queue size (2.7.5.3.1).
            budget += 1
            if dlen // 16 > <uint32_t>budget:
                return dev_mark_broken(r, B_CHAIN_TOO_LONG)
            table = gpa_to_ptr(r.table_ref[0], addr, dlen)
            if table == NULL:
                # Legal but rare: a table crossing a region boundary. Gather
                # it into scratch (entries are read once into locals either way).
                if gather(r.table_ref[0], addr, dlen, r.indirect_copy) < 0:
                    return dev_mark_broken(r, B_INDIRECT_UNMAPPED)
                table = r.indirect_copy
            # The chain continues inside the table only (a NEXT flag on
            # the indirect descriptor itself is ignored, as Linux and DPDK do).
            table_size = dlen // 16
            idx = 0
            in_indirect = True
            continue
        rc = add_buffer(r, c, addr, dlen, flags & DESC_F_WRITE, &seen_writable, &nseg, seg_base)
        if rc != 0:
            return rc
        if not (flags & DESC_F_NEXT):
            return 0
        if vhu_unlikely(nxt >= table_size):
            return dev_mark_broken(r, B_NEXT_OUT_OF_RANGE)
        idx = nxt


cdef int dev_pop_batch(DevRing *r, uint32_t max_chains) noexcept nogil:
    """Pop up to max_chains chains into r.chains / r.segs.
    Returns how many; 0 when none (or the ring is broken)."""
    if r.stash_n:
        dev_unpop_stash(r)
    return pop_chains(r, max_chains)


cdef int pop_chains(DevRing *r, uint32_t max_chains) noexcept nogil:
    cdef int pending
    if r.packed:
        if vhu_unlikely(r.log != NULL):
            return log_pk_pop_chains(r, max_chains)
        return pk_pop_chains(r, max_chains)
    pending = dev_avail_pending(r)
    cdef uint32_t i, n, nseg = 0
    cdef uint16_t head
    cdef int rc
    cdef ChainInfo *c
    cdef char *d
    cdef uint64_t addr, word
    cdef uint32_t dlen
    cdef uint16_t flags
    cdef char *p = NULL
    # Locals: stores through guest pointers could alias self's fields,
    # so the compiler would reload them every iteration.
    cdef MemTable *table = r.table_ref[0]
    cdef char *desc = r.desc
    cdef char *avail = r.avail
    cdef ChainInfo *chains = r.chains
    cdef Seg *segs = r.segs
    cdef uint32_t size = r.size, max_segs = r.max_segs
    cdef uint16_t mask = r.mask, last_avail = r.last_avail
    cdef RegionHit hit
    if pending <= 0:
        return 0
    hit_load(&hit, table)
    n = <uint32_t>pending
    if n > max_chains:
        n = max_chains
    if n > r.max_chains:
        n = r.max_chains
    for i in range(n):
        head = vhu_read_once_u16(avail_entry(avail, <uint16_t>(last_avail + i) & mask))
        c = &chains[i]
        # Fast path: one descriptor, no NEXT/INDIRECT, inside one region.
        if vhu_likely(head < size and nseg < max_segs):
            d = desc + 16 * <uint32_t>head
            addr = vhu_read_once_u64(d)
            word = vhu_read_once_u64(d + 8)      # len, flags, next: one load
            dlen = <uint32_t>word
            flags = <uint16_t>(word >> 32)
            if vhu_likely((flags & (DESC_F_NEXT | DESC_F_INDIRECT)) == 0 and dlen != 0):
                p = hit_translate(&hit, table, addr, dlen)
                if p != NULL:
                    c.head = head
                    c.seg_start = nseg
                    segs[nseg].ptr = p
                    segs[nseg].len = dlen
                    nseg += 1
                    if flags & DESC_F_WRITE:
                        c.nread = 0
                        c.nwrite = 1
                        c.read_len = 0
                        c.write_len = dlen
                    else:
                        c.nread = 1
                        c.nwrite = 0
                        c.read_len = dlen
                        c.write_len = 0
                    continue
        rc = dev_walk_chain(r, head, c, nseg)
        if rc != 0:
            if rc < 0:
                return 0          # broken: nothing of this batch is handed out
            n = i                 # out of segment space: the rest next time
            break
        nseg = c.seg_start + c.nread + c.nwrite
    VHU_ASSERT(nseg <= max_segs and n <= r.max_chains)
    r.last_avail = <uint16_t>(last_avail + n)
    r.counters[C_POPPED] += n
    if vhu_unlikely(r.log != NULL):
        log_popped(r, n)              # dirty logging: once per pop, not per frame
    return n


cdef void dev_push_used(DevRing *r, uint16_t head, uint32_t written) noexcept nogil:
    """Write one used element after the published index (invisible to the
    driver until publish_used). Call it in the batch of the dev_pop_batch
    that returned head: that call checked the ring is still mapped, and the
    memory table cannot change within a batch."""
    cdef char *e
    if r.packed:
        pk_push_used(r, head, written)
        return
    e = used_entry(r.used, r.shadow_used & r.mask)
    VHU_ASSERT(r.used != NULL and head < r.size)
    # Never more used entries in flight than the ring holds.
    VHU_ASSERT(<uint16_t>(r.shadow_used - r.published_used) < r.size or r.size == 1)
    vhu_write_once_u32(e, head)
    vhu_write_once_u32(e + 4, written)
    r.shadow_used += 1       # counted in C_PUSHED when published


cdef void dev_push_popped(DevRing *r, uint32_t n) noexcept nogil:
    """dev_push_used(chains[i].head, 0) for the first n chains of the last
    dev_pop_batch: a transmit ring's chains go back having only been read."""
    cdef uint32_t i
    cdef ChainInfo *chains = r.chains
    # Locals: stores into the shared ring could alias the struct's fields.
    cdef char *used = r.used
    cdef uint16_t mask = r.mask, shadow = r.shadow_used
    cdef char *e
    if r.packed:
        for i in range(n):
            pk_push_used(r, chains[i].head, 0)
        return
    VHU_ASSERT(used != NULL and n <= r.max_chains)
    VHU_ASSERT(<uint16_t>(shadow - r.published_used) + n <= r.size)
    for i in range(n):
        e = used_entry(used, shadow & mask)
        vhu_write_once_u32(e, chains[i].head)
        vhu_write_once_u32(e + 4, 0)
        shadow += 1
    r.shadow_used = shadow       # counted in C_PUSHED when published


cdef bint dev_publish_used(DevRing *r) noexcept nogil:
    """Store used->idx once for the whole batch; True if the driver wants
    an interrupt (the caller signals the call eventfd)."""
    cdef uint16_t old, new
    cdef bint notify
    if r.stash_n:
        dev_unpop_stash(r)
    if r.packed:
        if vhu_unlikely(r.log != NULL):
            return log_pk_publish_used(r)
        return pk_publish_used(r)
    old = r.published_used
    new = r.shadow_used
    if new == old or not dev_mem_ok(r):
        if vhu_unlikely(r.log != NULL):
            # Nothing used, but a merged frame that found no room midway
            # wrote into buffers it gave back: marked too (harmless).
            log_flush(r)
        return False
    # Release: every used element written above is visible before the index.
    vhu_store_release_u16(r.used + RING_IDX, new)
    r.published_used = new
    if vhu_unlikely(r.log != NULL):
        log_split_used(r, old, new)
        log_flush(r)
    # Where a replacement worker resumes (vhu.workers.supervisor).
    r.counters[C_POSITION] = new
    r.counters[C_PUSHED] += <uint16_t>(new - old)
    r.counters[C_PUBLISHED] += 1
    # Store (used->idx) then load (used_event / flags): needs a full fence,
    # or we may read a stale event index and miss a wanted interrupt.
    vhu_fence_full()
    if r.event_idx:
        notify = (not r.notify_valid) or need_event(
            vhu_read_once_u16(avail_entry(r.avail, <uint16_t>r.size)), new, old)
        r.notify_valid = True
    else:
        notify = not (vhu_read_once_u16(r.avail + RING_FLAGS) & AVAIL_F_NO_INTERRUPT)
    if notify:
        r.counters[C_NOTIFY] += 1
    else:
        r.counters[C_NOTIFY_SUPPRESSED] += 1
    return notify


cdef void dev_notifications_off(DevRing *r) noexcept nogil:
    if not dev_mem_ok(r):
        return
    if r.packed:
        pk_notifications(r, False)
        return
    if r.event_idx:
        # avail_event stays where it was: the driver kicks at most once
        # more (when it passes it), then not again until we move it.
        return
    vhu_write_once_u16(r.used + RING_FLAGS, USED_F_NO_NOTIFY)
    if vhu_unlikely(r.log != NULL):
        log_used_now(r, RING_FLAGS, 2)


cdef bint dev_notifications_on(DevRing *r) noexcept nogil:
    """Ask for kicks again. True if chains arrived meanwhile: the caller
    must poll again instead of sleeping, or a racing kick is lost."""
    if r.broken or not dev_mem_ok(r):
        return False
    if r.stash_n:
        dev_unpop_stash(r)
    if r.packed:
        pk_notifications(r, True)
    elif r.event_idx:
        vhu_write_once_u16(used_entry(r.used, <uint16_t>r.size), r.last_avail)
        if vhu_unlikely(r.log != NULL):
            log_used_now(r, RING_ENTRIES + 8 * <uint64_t>r.size, 2)
    else:
        vhu_write_once_u16(r.used + RING_FLAGS, 0)
        if vhu_unlikely(r.log != NULL):
            log_used_now(r, RING_FLAGS, 2)
    # Store (flags / avail_event) then load (avail->idx): full fence.
    vhu_fence_full()
    return dev_avail_pending(r) > 0


cdef inline ChainInfo *rx_next_chain(DevRing *r) noexcept nogil:
    """The next receive chain: from the stash, refilled a batch at a time
    (one avail->idx load and one memory check per batch, not per frame)."""
    cdef int n
    if r.stash_i == r.stash_n:
        n = pop_chains(r, RX_STASH if RX_STASH < r.max_chains else r.max_chains)
        r.stash_n = n if n > 0 else 0
        r.stash_i = 0
        if n <= 0:
            return NULL
        # No prefetch of the buffers' lines for writing here: it cost the
        # source app up to 3x and packed forwarding 5-10% (perf/PROFILE.md,
        # "Prefetching the batch").
    VHU_ASSERT(r.stash_i < r.stash_n and r.stash_n <= r.max_chains)
    r.stash_i += 1
    return &r.chains[r.stash_i - 1]


cdef void dev_unpop_stash(DevRing *r) noexcept nogil:
    """Give back receive chains popped ahead but not used: they are the last
    ones popped, so rewinding last_avail returns them to the driver's side."""
    cdef uint32_t k = r.stash_n - r.stash_i
    if r.packed:
        if k:
            pk_unpop(r, r.stash_i)
    else:
        r.last_avail = <uint16_t>(r.last_avail - k)
    r.counters[C_POPPED] -= k
    r.stash_n = r.stash_i = 0


cdef int dev_rx_enqueue(DevRing *r, const Seg *src, uint32_t nsrc, uint64_t skip, uint64_t frame_len) noexcept nogil:
    """dev_rx_enqueue_hdr with a header that asks for nothing."""
    return dev_rx_enqueue_hdr(r, NULL, src, nsrc, skip, frame_len)


cdef inline void write_net_hdr(char *p, const uint8_t *vnet_hdr, uint32_t hdr_len) noexcept nogil:
    """A one-buffer frame's virtio-net header, stored straight from
    registers: the first 10 bytes from vnet_hdr (zeros if NULL), then
    num_buffers 1 where the header has it.

    Not copied from a header built on the stack: the copy's loads would
    each span several of the stores that built it, a load the store buffer
    cannot forward, and such a load waits until every older store has
    reached the cache, behind the previous frame's stores into guest
    buffers, whose lines the front-end's CPU holds (perf/PROFILE.md, "A
    header load behind the last frame's stores")."""
    cdef uint64_t head = 0          # flags, gso_type, hdr_len, gso_size, csum_start
    cdef uint16_t csum_offset = 0
    if vnet_hdr != NULL:
        memcpy(&head, vnet_hdr, 8)
        memcpy(&csum_offset, vnet_hdr + 8, 2)
    memcpy(p, &head, 8)
    memcpy(p + 8, &csum_offset, 2)
    if hdr_len == 12:
        vhu_write_once_u16(p + 10, 1)       # num_buffers


cdef int dev_rx_enqueue_hdr(DevRing *r, const uint8_t *vnet_hdr, const Seg *src, uint32_t nsrc,
                            uint64_t skip, uint64_t frame_len) noexcept nogil:
    """Deliver one frame (frame_len bytes of src after skip) into the
    driver's receive buffers, with a virtio-net header in front: its first
    10 bytes (flags .. csum_offset) from vnet_hdr, or zeros if NULL.
    Returns 1 delivered, 0 no room (nothing consumed), -1 dropped
    (does not fit one chain without mergeable buffers) or ring broken.

    Pushes are not visible until publish_used, so running out of buffers
    halfway through a mergeable frame is undone by rewinding our indices."""
    cdef uint8_t hdr[12]
    cdef Seg hseg
    cdef Seg first[12]        # where the header landed: num_buffers is written there last
    cdef uint32_t nfirst = 0, j
    cdef uint32_t hdr_len = r.hdr_len
    cdef uint64_t need = hdr_len + frame_len, done = 0, room, off, n
    # Where to rewind if the frame finds no room: the first chain it would
    # take (stashed chains are already popped), and the used state now.
    cdef uint16_t start_avail = <uint16_t>(r.last_avail - (r.stash_n - r.stash_i))
    cdef uint16_t start_wrap = r.avail_wrap
    cdef uint16_t start_used = r.shadow_used
    cdef uint32_t start_npend = r.npend
    cdef uint64_t popped_before = r.counters[C_POPPED] - (r.stash_n - r.stash_i)
    cdef uint16_t nbufs = 0
    cdef ChainInfo *c
    cdef Seg *w
    if r.packed:
        if r.stash_i < r.stash_n:
            start_avail = r.chains[r.stash_i].pos
            start_wrap = r.chains[r.stash_i].wrap
        else:
            start_avail = r.last_avail
    memset(hdr, 0, 12)
    if vnet_hdr != NULL:
        memcpy(hdr, vnet_hdr, 10)
    if hdr_len == 12:
        hdr[10] = 1           # num_buffers: 1 unless a mergeable frame spans more
    hseg.ptr = <char *>hdr
    hseg.len = hdr_len
    while done < need:
        c = rx_next_chain(r)
        if c == NULL:
            # Out of buffers (or broken) midway: give back what we took.
            if vhu_unlikely(r.log != NULL) and not r.packed:
                # Split used entries already written past used->idx (never
                # published, but written): logged with the batch.
                log_split_used(r, start_used, r.shadow_used)
            r.counters[C_POPPED] = popped_before
            r.last_avail = start_avail
            r.avail_wrap = start_wrap
            r.shadow_used = start_used
            r.npend = start_npend
            r.stash_n = r.stash_i = 0
            if r.broken:
                return -1
            r.counters[C_RX_NO_ROOM] += 1
            return 0
        w = &r.segs[c.seg_start + c.nread]
        room = c.write_len
        if done == 0 and room < (need if not r.mergeable else hdr_len):
            if not r.mergeable:
                # Leave the buffer for a frame that fits; this one is dropped.
                r.stash_i -= 1
                r.counters[C_RX_TOO_BIG] += 1
                return -1
            # A mergeable buffer smaller than the header breaks the
            # driver's own rule (5.1.6.3.1): return it unused.
            dev_push_used(r, c.head, 0)
            continue
        if done == 0 and c.nwrite == 1 and room >= need:
            # Fast path: header and frame into one buffer. The frame is one
            # segment, or a few (the switch's private head copy and the rest
            # of the guest's buffer: copied in one pass, no bookkeeping of
            # where the header landed).
            write_net_hdr(w.ptr, vnet_hdr, hdr_len)
            if nsrc == 1:
                memcpy(w.ptr + hdr_len, src.ptr + skip, frame_len)
            elif (nsrc == 2 and skip <= src[0].len and frame_len >= src[0].len - skip
                    and frame_len - (src[0].len - skip) <= src[1].len):
                n = src[0].len - skip          # the head copy, then the guest's rest
                memcpy(w.ptr + hdr_len, src[0].ptr + skip, n)
                memcpy(w.ptr + hdr_len + n, src[1].ptr, frame_len - n)
            else:
                copy_segs(w, 1, hdr_len, src, nsrc, skip, frame_len)
            dev_push_used(r, c.head, <uint32_t>need)
            r.counters[C_RX_FRAMES] += 1
            r.counters[C_RX_BYTES] += frame_len
            return 1
        off = 0
        if done == 0:
            copy_segs(w, c.nwrite, 0, &hseg, 1, 0, hdr_len)
            for j in range(c.nwrite if c.nwrite < 12 else 12):
                first[j] = w[j]
            nfirst = j + 1 if c.nwrite else 0
            off = hdr_len
            done = hdr_len
        n = need - done
        if room - off < n:
            n = room - off
        if n:
            copy_segs(w, c.nwrite, off, src, nsrc, skip + (done - hdr_len), n)
            off += n
            done += n
        dev_push_used(r, c.head, <uint32_t>off)
        nbufs += 1
    if hdr_len == 12 and nbufs > 1:
        hdr[10] = nbufs & 0xFF
        hdr[11] = nbufs >> 8
        copy_segs(first, nfirst, 10, &hseg, 1, 10, 2)
    r.counters[C_RX_FRAMES] += 1
    r.counters[C_RX_BYTES] += frame_len
    return 1


cdef inline void write_desc(char *d, uint64_t gpa, uint32_t length, uint16_t flags,
                             uint16_t nxt) noexcept nogil:
    # Two 8-byte stores, not four: len, flags and next are one little-endian
    # u64 (descriptors are at least 8-byte aligned, vhu.ring_layout). Stores are what the
    # refill path is bound by.
    vhu_write_once_u64(d, gpa)
    vhu_write_once_u64(d + 8, length | (<uint64_t>flags << 32) | (<uint64_t>nxt << 48))


cdef inline void drv_track(DrvRing *r, uint16_t head, uint16_t ndesc) noexcept nogil:
    """A chain goes in flight (and, in order, to the back of the FIFO)."""
    r.chain_len[head] = ndesc       # non-zero: in flight
    if r.in_order:
        r.order[(r.order_head + r.order_count) % r.size] = head
        r.order_count += 1


cdef void drv_make_available(DrvRing *r, uint16_t head, uint16_t ndesc) noexcept nogil:
    drv_track(r, head, ndesc)
    vhu_write_once_u16(avail_entry(r.avail, r.shadow_avail & r.mask), head)
    r.shadow_avail += 1


cdef int drv_add_one(DrvRing *r, uint64_t gpa, uint32_t length, uint16_t flags) noexcept nogil:
    """One single-descriptor chain (flags: 0 readable or DESC_F_WRITE).
    Returns its head (split) or buffer id (packed), or -1 when the ring is full."""
    cdef uint16_t head = <uint16_t>r.free_head      # the one drv_add_slots takes
    if drv_add_slots(r, gpa, 0, length, flags, 1) == 0:
        return -1
    return head


cdef uint32_t drv_add_slots(DrvRing *r, uint64_t base_gpa, uint32_t slot_bytes, uint32_t length,
                           uint16_t flags, uint32_t max_chains) noexcept nogil:
    """Up to max_chains single-descriptor chains, as many as there is room
    for, over a front-end's fixed buffer slots: the chain with head (split)
    or buffer id (packed) h gets the buffer at base_gpa + h * slot_bytes
    (slot_bytes 0: every chain gets base_gpa). Returns how many were added.
    The caller checked drv_mem_ok for this batch."""
    cdef uint32_t n = 0, head
    # Locals: stores into the shared ring could alias the struct's fields.
    cdef uint32_t free_head = r.free_head, num_free = r.num_free
    cdef uint16_t shadow = r.shadow_avail, mask = r.mask
    cdef char *desc = r.desc
    cdef char *avail = r.avail
    cdef uint16_t *free_next = r.free_next
    if r.packed:
        return pk_drv_add_slots(r, base_gpa, slot_bytes, length, flags, max_chains)
    while n < max_chains and num_free:
        head = free_head
        free_head = free_next[head]
        num_free -= 1
        write_desc(desc + 16 * head, base_gpa + <uint64_t>head * slot_bytes, length, flags, 0)
        drv_track(r, <uint16_t>head, 1)
        vhu_write_once_u16(avail_entry(avail, shadow & mask), <uint16_t>head)
        shadow += 1
        n += 1
    r.free_head = free_head
    r.num_free = num_free
    r.shadow_avail = shadow
    return n


cdef bint drv_publish_avail(DrvRing *r) noexcept nogil:
    """Store avail->idx (release); True if the device wants a kick."""
    cdef uint16_t old = r.published_avail, new = r.shadow_avail
    if r.packed:
        return drv_mem_ok(r) and pk_drv_publish(r)
    if new == old or not drv_mem_ok(r):
        return False
    # Release: descriptors and avail entries are visible before the index.
    vhu_store_release_u16(r.avail + RING_IDX, new)
    r.published_avail = new
    # Store (avail->idx) then load (avail_event / used flags): full fence.
    vhu_fence_full()
    if r.event_idx:
        return need_event(vhu_read_once_u16(used_entry(r.used, <uint16_t>r.size)), new, old)
    return not (vhu_read_once_u16(r.used + RING_FLAGS) & USED_F_NO_NOTIFY)


cdef int drv_reclaim(DrvRing *r, uint16_t *heads, uint32_t *lens, int max_items) noexcept nogil:
    """Take back up to max_items used chains: (head, written) into the
    arrays, descriptors back on the free list. -1 if the device returned
    an id that is not in flight (a broken device)."""
    cdef uint16_t used_idx, last_used, mask = r.mask
    cdef int n = 0, rc = 0
    cdef char *e
    cdef char *used
    cdef uint32_t head, nd, free_head, num_free, size = r.size
    cdef uint16_t *chain_len = r.chain_len
    cdef uint16_t *free_next = r.free_next
    if not drv_mem_ok(r):
        return -1
    used = r.used
    if r.in_order:
        return drv_reclaim_in_order(r, heads, lens, max_items)
    if r.packed:
        return pk_drv_reclaim(r, heads, lens, max_items)
    # Locals: stores into heads/lens could alias the struct's fields.
    last_used = r.last_used
    free_head = r.free_head
    num_free = r.num_free
    used_idx = vhu_load_acquire_u16(used + RING_IDX)
    while last_used != used_idx and n < max_items:
        e = used_entry(used, last_used & mask)
        VHU_ASSERT(num_free <= size)
        head = vhu_read_once_u32(e)
        if head >= size or chain_len[head] == 0:
            rc = -1             # not a chain we made available
            break
        heads[n] = <uint16_t>head
        lens[n] = vhu_read_once_u32(e + 4)
        nd = chain_len[head]
        free_head = free_list_splice(free_next, <uint16_t>head, nd, free_head)
        num_free += nd
        chain_len[head] = 0     # no longer in flight
        last_used += 1
        n += 1
    r.last_used = last_used
    r.free_head = free_head
    r.num_free = num_free
    return rc if rc < 0 else n


cdef inline uint32_t free_list_splice(uint16_t *free_next, uint16_t head, uint32_t ndesc,
                                      uint32_t free_head) noexcept nogil:
    """Split ring: put the chain head..tail (ndesc descriptors, linked
    through free_next when added) in front of free_head; the new free head."""
    cdef uint32_t tail = head
    while ndesc > 1:
        tail = free_next[tail]
        ndesc -= 1
    free_next[tail] = <uint16_t>free_head
    return head


cdef inline void drv_free_chain(DrvRing *r, uint16_t head) noexcept nogil:
    cdef uint32_t ndesc = r.chain_len[head]
    if r.packed:
        # Packed: descriptors belong to ring positions; the id alone is freed.
        r.free_next[head] = <uint16_t>r.free_head
        r.free_head = head
    else:
        r.free_head = free_list_splice(r.free_next, head, ndesc, r.free_head)
    r.num_free += ndesc
    r.chain_len[head] = 0           # no longer in flight


cdef int drv_reclaim_in_order(DrvRing *r, uint16_t *heads, uint32_t *lens, int max_items) noexcept nogil:
    """VIRTIO_F_IN_ORDER (virtio 1.x 2.7.9, 2.8.20): the device may write
    one used entry for a batch, naming the batch's last chain, and skip the
    ring forward over the rest. Chains come back in the order they were made
    available, up to and including the named one; the others report 0
    bytes written (a device only batches chains it wrote nothing into)."""
    cdef int n = 0
    cdef uint16_t used_idx = 0, flags, head
    cdef char *e
    if not r.packed:
        used_idx = vhu_load_acquire_u16(r.used + RING_IDX)
    while n < max_items:
        if r.packed:
            if r.num_free >= r.size:
                break
        elif r.last_used == used_idx:
            break
        if not r.draining:
            if r.packed:
                e = r.desc + 16 * <uint32_t>r.last_used
                flags = vhu_load_acquire_u16(e + 14)
                if not pk_used(flags, r.used_wrap):
                    if pk_impossible(flags, r.used_wrap):
                        return -1
                    break
                r.drain_id = vhu_read_once_u16(e + 12)
                r.drain_len = vhu_read_once_u32(e + 8) if flags & DESC_F_WRITE else 0
            else:
                e = used_entry(r.used, r.last_used & r.mask)
                if vhu_read_once_u32(e) >= r.size:
                    return -1
                r.drain_id = <uint16_t>vhu_read_once_u32(e)
                r.drain_len = vhu_read_once_u32(e + 4)
            if r.drain_id >= r.size or r.chain_len[r.drain_id] == 0:
                return -1
            r.draining = True
        head = r.order[r.order_head]
        VHU_ASSERT(r.order_count > 0 and r.chain_len[head] != 0)
        r.order_head = (r.order_head + 1) % r.size
        r.order_count -= 1
        heads[n] = head
        lens[n] = r.drain_len if head == r.drain_id else 0
        if r.packed:
            pk_advance(&r.last_used, &r.used_wrap, r.chain_len[head], r.size)
        else:
            r.last_used += 1
        drv_free_chain(r, head)
        n += 1
        if head == r.drain_id:
            r.draining = False
    return n


include "_ring_packed.pxi"
include "_ring_log.pxi"


cdef class Chain:
    """One available descriptor chain as the device sees it (zero-copy views)."""

    def __repr__(self):
        return (f"Chain(head={self.head}, read_len={self.read_len}, "
                f"write_len={self.write_len}, segments={len(self.readable)}+{len(self.writable)})")


cdef int translate_ring(MemTable *t, bint uva, uint64_t desc_addr, uint64_t avail_addr,
                        uint64_t used_addr, const uint64_t *part_len,
                        char **d, char **a, char **u) noexcept nogil:
    """Local addresses of the three ring parts, each whole inside one region;
    -1 (and NULLs) if any is not. part_len: their lengths, from
    vhu.ring_layout.part_lengths when the ring was set up."""
    cdef uint64_t dlen = part_len[0], alen = part_len[1], ulen = part_len[2]
    if uva:
        d[0] = uva_to_ptr(t, desc_addr, dlen)
        a[0] = uva_to_ptr(t, avail_addr, alen)
        u[0] = uva_to_ptr(t, used_addr, ulen)
    else:
        d[0] = gpa_to_ptr(t, desc_addr, dlen)
        a[0] = gpa_to_ptr(t, avail_addr, alen)
        u[0] = gpa_to_ptr(t, used_addr, ulen)
    if d[0] == NULL or a[0] == NULL or u[0] == NULL:
        d[0] = a[0] = u[0] = NULL
        return -1
    return 0


cdef class DeviceRing:
    """Device side of a split virtqueue (what the back-end runs).

    The state is a C struct (self.r) so compiled loops can drive many rings
    without the GIL; this class owns it, its scratch arrays and the memory
    reference that keeps the struct's table pointers valid."""

    def __cinit__(self):
        memset(&self.r, 0, sizeof(DevRing))
        memset(self.own_counters, 0, sizeof(self.own_counters))
        self.r.counters = self.own_counters

    def __init__(self, GuestMemory mem not None, size, desc_addr, avail_addr, used_addr, *,
                 addr_space="uva", event_idx=False, indirect=True, features=0, packed=False,
                 device_reads=False):
        check_queue_size(size, packed)
        if addr_space not in ("uva", "gpa"):
            raise RingError(f"addr_space must be 'uva' or 'gpa', not {addr_space!r}")
        _check_layout(desc_addr, avail_addr, used_addr, packed)
        _set_part_len(self.r.part_len, size, packed)
        self.mem = mem
        self.r.table_ref = &mem.table
        self.r.generation_ref = &mem.generation
        self.r.size = size
        self.r.mask = <uint16_t>(size - 1)
        self.r.packed = bool(packed)
        self.r.avail_wrap = self.r.used_wrap = 1      # both wrap counters start at 1 (2.8.1)
        self.r.addr_uva = addr_space == "uva"
        self.r.desc_addr = desc_addr
        self.r.avail_addr = avail_addr
        self.r.used_addr = used_addr
        self.r.event_idx = bool(event_idx)
        self.r.indirect = bool(indirect)
        self.r.device_reads = bool(device_reads)
        self.r.batch_used = bool(packed and device_reads and int(features) & F_IN_ORDER)
        self.r.mergeable = bool(int(features) & F_MRG_RXBUF)
        self.r.hdr_len = net_header_len(features)
        # Scratch for one batch: at most `size` chains in flight, and a chain
        # of at most `size` descriptors, each possibly split at a region edge.
        self.r.max_chains = size
        self.r.max_segs = 2 * size + 64
        self.r.chains = <ChainInfo *>malloc(self.r.max_chains * sizeof(ChainInfo))
        self.r.segs = <Seg *>malloc(self.r.max_segs * sizeof(Seg))
        self.r.indirect_copy = <char *>malloc(16 * <size_t>size)
        self.r.id_ndesc = <uint16_t *>calloc(size, sizeof(uint16_t))
        self.r.pend_id = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.r.pend_len = <uint32_t *>malloc(size * sizeof(uint32_t))
        if (self.r.chains == NULL or self.r.segs == NULL or self.r.indirect_copy == NULL
                or self.r.id_ndesc == NULL or self.r.pend_id == NULL or self.r.pend_len == NULL):
            raise MemoryError()
        self.remap()

    def __dealloc__(self):
        free(self.r.chains)
        free(self.r.segs)
        free(self.r.indirect_copy)
        free(self.r.id_ndesc)
        free(self.r.pend_id)
        free(self.r.pend_len)
        free(self.r.dirty)

    cdef DevRing *ring(self):
        return &self.r

    def remap(self):
        """Re-translate the ring addresses after the memory table changed."""
        self.r.mem_generation = self.mem.generation
        if translate_ring(self.mem.table, self.r.addr_uva, self.r.desc_addr, self.r.avail_addr,
                          self.r.used_addr, self.r.part_len,
                          &self.r.desc, &self.r.avail, &self.r.used) < 0:
            dev_mark_broken(&self.r, B_RING_UNMAPPED)
            what = "uva" if self.r.addr_uva else "gpa"
            raise RingError(
                f"ring not inside guest memory ({what}): desc {self.r.desc_addr:#x}+{self.r.part_len[0]:#x}, "
                f"avail {self.r.avail_addr:#x}+{self.r.part_len[1]:#x}, "
                f"used {self.r.used_addr:#x}+{self.r.part_len[2]:#x}")
        if self.r.broken == B_RING_UNMAPPED:
            self.r.broken = B_OK

    def bind_counters(self, buffer, Py_ssize_t offset=0):
        """Keep this ring's counters in `buffer` (e.g. shared memory read by
        another process) at byte offset `offset`: len(COUNTER_NAMES) u64s.
        The values already there are kept and counted on from: counters of
        a queue survive the ring being set up again (a reconnect)."""
        cdef unsigned char[::1] mv = buffer
        cdef Py_ssize_t need = C_COUNT * sizeof(uint64_t)
        if offset < 0 or offset % 8 or offset + need > mv.shape[0]:
            raise ValueError(f"counters need {need} bytes at an 8-aligned offset inside the buffer")
        self.r.counters = <uint64_t *>&mv[offset]
        self.counters_owner = buffer

    def set_log(self, log=None, Py_ssize_t offset=0, uint64_t size=0, *, log_used=False,
                uint64_t used_gpa=0):
        """Dirty-page logging (vhost-user "Migration", vhu/_ring_log.pxi).
        log: the mapped log (a writable buffer; the bitmap is `size` bytes at
        byte `offset` of it), or None: logging off. log_used / used_gpa:
        VHOST_VRING_F_LOG and log_guest_addr of SET_VRING_ADDR (used-ring
        writes are logged there). Between batches only (the worker applies
        it between two packets); pages collected and not yet published stay
        collected across a change of log, and are dropped when it goes off."""
        cdef unsigned char[::1] mv
        if log is None:
            self.r.log = NULL
            self.r.log_size = 0
            self.log_owner = None
            log_discard(&self.r)
            return
        mv = log
        if offset < 0 or size == 0 or <uint64_t>offset + size > <uint64_t>mv.shape[0]:
            raise ValueError(f"log of {size} bytes at {offset} does not fit the buffer "
                             f"({mv.shape[0]} bytes)")
        if self.r.dirty == NULL:
            self.r.dirty = <uint64_t *>malloc(LOG_MAX_DIRTY * sizeof(uint64_t))
            if self.r.dirty == NULL:
                raise MemoryError()
            self.r.max_dirty = LOG_MAX_DIRTY
            log_discard(&self.r)
        self.log_owner = log
        self.r.log_used = bool(log_used)
        self.r.log_used_gpa = used_gpa
        self.r.log_size = size
        self.r.log = <uint8_t *>&mv[offset]

    @property
    def logging(self):
        """True while dirty pages are logged."""
        return self.r.log != NULL

    def flush_log(self):
        """Mark what was collected and not published yet (the ring stops:
        buffers a frame wrote into before finding no room are marked too)."""
        if self.r.log != NULL:
            log_flush(&self.r)

    # -- configuration and state -------------------------------------------

    @property
    def size(self):
        return self.r.size

    @property
    def event_idx(self):
        return bool(self.r.event_idx)

    @property
    def indirect(self):
        return bool(self.r.indirect)

    @property
    def mergeable(self):
        return bool(self.r.mergeable)

    @property
    def hdr_len(self):
        return self.r.hdr_len

    @property
    def packed(self):
        return bool(self.r.packed)

    @property
    def last_avail_idx(self):
        """GET_VRING_BASE's value. Packed: position | avail wrap counter << 15."""
        if self.r.stash_n:
            dev_unpop_stash(&self.r)
        if self.r.packed:
            return self.r.last_avail | (self.r.avail_wrap << 15)
        return self.r.last_avail

    @last_avail_idx.setter
    def last_avail_idx(self, value):
        """SET_VRING_BASE: the next chain to pop; the used index restarts there
        too. Packed rings carry the wrap counter in bit 15."""
        value = int(value)
        if not 0 <= value <= 0xFFFF:
            raise RingError(f"ring base {value} is not a 16-bit index")
        self.r.stash_n = self.r.stash_i = 0
        self.r.npend = 0
        if self.r.packed:
            if value & 0x7FFF >= self.r.size:
                raise RingError(f"packed ring base {value & 0x7FFF} >= queue size {self.r.size}")
            self.r.avail_wrap = self.r.used_wrap = value >> 15
            value &= 0x7FFF
        self.r.last_avail = value
        self.r.shadow_used = value
        self.r.published_used = value
        self.r.notify_valid = False
        self.r.counters[C_POSITION] = value | (<uint64_t>self.r.used_wrap << 15 if self.r.packed else 0)

    def resume(self):
        """A replacement worker takes over this ring at the position its
        predecessor last published (C_POSITION). A packed ring can hold used
        descriptors past that position if the predecessor died inside a
        publish (after writing later slots, before the first slot's flags
        and the position): the device would wait there forever, since those
        slots no longer look available. Skip them, one slot each (exact for
        one-descriptor chains, what virtio-net drivers post); under IN_ORDER
        batching, the one used slot and the batch it names. Returns the
        number of slots skipped; split rings resume at used->idx instead."""
        cdef uint32_t skipped = 0
        cdef uint16_t flags
        if not self.r.packed or not dev_mem_ok(&self.r):
            return 0
        while skipped < self.r.size:
            flags = vhu_read_once_u16(self.r.desc + 16 * <uint32_t>self.r.last_avail + 14)
            if not pk_used(flags, self.r.avail_wrap):
                break
            if self.r.batch_used:
                # One used descriptor stands for its whole batch (IN_ORDER):
                # the batch's other chains still look available.
                skipped += pk_skip_batch(&self.r)
                break
            pk_advance(&self.r.last_avail, &self.r.avail_wrap, 1, self.r.size)
            skipped += 1
        if skipped:
            self.r.shadow_used = self.r.last_avail
            self.r.published_used = self.r.last_avail
            self.r.used_wrap = self.r.avail_wrap
            self.r.counters[C_POSITION] = self.r.last_avail | (<uint64_t>self.r.avail_wrap << 15)
        return skipped

    @property
    def used_idx(self):
        if self.r.packed:
            return self.r.shadow_used | (self.r.used_wrap << 15)
        return self.r.shadow_used

    @property
    def broken(self):
        return self.r.broken != B_OK

    @property
    def broken_reason(self):
        return _BROKEN[self.r.broken][1] if self.r.broken else None

    @property
    def stats(self):
        cdef int i
        return {COUNTER_NAMES[i]: self.r.counters[i] for i in range(C_COUNT)
                if i != C_BROKEN_FIRST}

    # -- Python API (objects per chain: tests, tools, control code) ---------

    def avail_count(self):
        n = dev_avail_pending(&self.r)
        return n if n > 0 else 0

    cdef Chain _chain_object(self, ChainInfo *c):
        cdef Chain ch = Chain.__new__(Chain)
        cdef uint32_t j
        cdef Seg *s
        ch.head = c.head
        ch.read_len = c.read_len
        ch.write_len = c.write_len
        ch.readable = []
        ch.writable = []
        for j in range(c.nread + c.nwrite):
            s = &self.r.segs[c.seg_start + j]
            v = make_view(s.ptr, s.len, self.mem._mapping_of(s.ptr))
            (ch.readable if j < c.nread else ch.writable).append(v)
        return ch

    def pop(self, max_chains):
        cdef uint32_t i, n
        if max_chains <= 0:
            return []
        n = dev_pop_batch(&self.r, min(int(max_chains), self.r.max_chains))
        return [self._chain_object(&self.r.chains[i]) for i in range(n)]

    def push(self, head, written):
        if not 0 <= head < self.r.size:
            raise ValueError(f"head {head} out of range for queue size {self.r.size}")
        if not 0 <= written <= 0xFFFFFFFF:
            raise ValueError(f"written length {written} is not a u32")
        if dev_mem_ok(&self.r):       # else: the ring is unmapped and marked broken
            dev_push_used(&self.r, head, written)

    def publish(self):
        return dev_publish_used(&self.r)

    def disable_notifications(self):
        dev_notifications_off(&self.r)

    def enable_notifications(self):
        return dev_notifications_on(&self.r)

    def tx_frames(self, max_frames):
        """Frames the driver sent, header stripped; their chains are pushed
        with written=0 (the caller publishes)."""
        cdef uint32_t i, n
        cdef ChainInfo *c
        cdef uint64_t flen
        cdef Seg dst
        out = []
        if max_frames <= 0:
            return out
        n = dev_pop_batch(&self.r, min(int(max_frames), self.r.max_chains))
        for i in range(n):
            c = &self.r.chains[i]
            if c.read_len < self.r.hdr_len:
                self.r.counters[C_TX_SHORT] += 1
            else:
                flen = c.read_len - self.r.hdr_len
                frame = PyBytes_FromStringAndSize(NULL, flen)
                dst.ptr = PyBytes_AS_STRING(frame)
                dst.len = <uint32_t>flen
                copy_segs(&dst, 1, 0, &self.r.segs[c.seg_start], c.nread, self.r.hdr_len, flen)
                out.append(frame)
                self.r.counters[C_TX_FRAMES] += 1
                self.r.counters[C_TX_BYTES] += flen
        dev_push_popped(&self.r, n)
        return out

    def rx_frames(self, frames):
        """Deliver frames with a virtio-net header; returns how many were
        delivered, stopping at the first that finds no room. A frame that
        cannot fit one buffer without mergeable buffers is dropped (counted
        in rx_too_big) and counts as handled."""
        cdef Seg s
        cdef const unsigned char[:] data
        cdef int rc
        delivered = 0
        for f in frames:
            data = f
            s.ptr = <char *>&data[0] if data.shape[0] else <char *>""
            s.len = data.shape[0]
            rc = dev_rx_enqueue(&self.r, &s, 1, 0, data.shape[0])
            if rc == 0:
                break
            if rc < 0 and self.r.broken:
                break
            delivered += rc > 0
        return delivered


cdef class DriverRing:
    """Driver side of a split virtqueue (what a front-end runs). State in a
    C struct (self.r) for compiled loops, as for DeviceRing."""

    def __cinit__(self):
        memset(&self.r, 0, sizeof(DrvRing))

    def __init__(self, GuestMemory mem not None, size, desc_gpa, avail_gpa, used_gpa, *,
                 event_idx=False, start_idx=None, packed=False, in_order=False):
        cdef uint32_t i
        check_queue_size(size, packed)
        _check_layout(desc_gpa, avail_gpa, used_gpa, packed)
        _set_part_len(self.r.part_len, size, packed)
        self.r.packed = bool(packed)
        self.mem = mem
        self.r.table_ref = &mem.table
        self.r.generation_ref = &mem.generation
        self.r.size = size
        self.r.mask = <uint16_t>(size - 1)
        self.r.event_idx = bool(event_idx)
        self.r.desc_gpa = desc_gpa
        self.r.avail_gpa = avail_gpa
        self.r.used_gpa = used_gpa
        self.r.free_next = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.r.chain_len = <uint16_t *>calloc(size, sizeof(uint16_t))
        self.r.pend_pos = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.r.pend_flags = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.r.order = <uint16_t *>malloc(size * sizeof(uint16_t))
        self.r.in_order = bool(in_order)
        if (self.r.order == NULL or self.r.free_next == NULL or self.r.chain_len == NULL
                or self.r.pend_pos == NULL or self.r.pend_flags == NULL):
            raise MemoryError()
        self.remap()
        memset(self.r.desc, 0, self.r.part_len[0])
        memset(self.r.avail, 0, self.r.part_len[1])
        memset(self.r.used, 0, self.r.part_len[2])
        for i in range(size):
            self.r.free_next[i] = <uint16_t>(i + 1)
        self.r.free_head = 0
        self.r.num_free = size
        if packed:
            start_idx = 0x8000 if start_idx is None else int(start_idx) & 0xFFFF
            if start_idx & 0x7FFF >= size:
                raise RingError(f"packed start position {start_idx & 0x7FFF} >= size {size}")
            self.r.avail_wrap = self.r.used_wrap = start_idx >> 15
            self.r.shadow_avail = self.r.published_avail = self.r.last_used = start_idx & 0x7FFF
            return
        start_idx = int(start_idx or 0) & 0xFFFF
        self.r.shadow_avail = self.r.published_avail = self.r.last_used = start_idx
        vhu_write_once_u16(self.r.avail + RING_IDX, start_idx)
        vhu_write_once_u16(self.r.used + RING_IDX, start_idx)

    def __dealloc__(self):
        free(self.r.free_next)
        free(self.r.chain_len)
        free(self.r.pend_pos)
        free(self.r.pend_flags)
        free(self.r.order)

    cdef DrvRing *ring(self):
        return &self.r

    def remap(self):
        self.r.mem_generation = self.mem.generation
        if translate_ring(self.mem.table, False, self.r.desc_gpa, self.r.avail_gpa, self.r.used_gpa,
                          self.r.part_len, &self.r.desc, &self.r.avail, &self.r.used) < 0:
            raise RingError("driver ring not inside guest memory")

    @property
    def size(self):
        return self.r.size

    @property
    def event_idx(self):
        return bool(self.r.event_idx)

    @property
    def in_order(self):
        return bool(self.r.in_order)

    @property
    def free_count(self):
        return self.r.num_free

    @property
    def avail_idx(self):
        return self.r.shadow_avail

    def add(self, readable, writable=(), *, indirect_gpa=None):
        """Make one chain of (gpa, len) buffers available (until publish, invisible)."""
        bufs = [(int(a), int(l), 0) for a, l in readable] + \
               [(int(a), int(l), DESC_F_WRITE) for a, l in writable]
        cdef uint32_t n = len(bufs), i
        cdef uint16_t head, idx, prev
        cdef char *table
        if n == 0:
            raise RingError("a chain needs at least one buffer")
        if not drv_mem_ok(&self.r):
            raise RingError("driver ring no longer inside guest memory")
        if self.r.packed:
            return self._add_packed(bufs, indirect_gpa)
        if indirect_gpa is not None:
            if self.r.num_free < 1:
                raise RingError("ring full")
            table = gpa_to_ptr(self.mem.table, indirect_gpa, 16 * <uint64_t>n)
            if table == NULL:
                raise RingError(f"indirect table at {indirect_gpa:#x} not in guest memory")
            for i in range(n):
                a, l, f = bufs[i]
                write_desc(table + 16 * i, a, l,
                           f | (DESC_F_NEXT if i + 1 < n else 0), i + 1 if i + 1 < n else 0)
            head = <uint16_t>self.r.free_head
            self.r.free_head = self.r.free_next[head]
            self.r.num_free -= 1
            write_desc(self.r.desc + 16 * <uint32_t>head, indirect_gpa, 16 * n, DESC_F_INDIRECT, 0)
            drv_make_available(&self.r, head, 1)
            return head
        if self.r.num_free < n:
            raise RingError(f"ring full: {self.r.num_free} free descriptors, chain needs {n}")
        head = <uint16_t>self.r.free_head
        idx = head
        for i in range(n):
            a, l, f = bufs[i]
            self.r.num_free -= 1
            prev = idx
            if i + 1 < n:
                idx = self.r.free_next[idx]
                write_desc(self.r.desc + 16 * <uint32_t>prev, a, l, f | DESC_F_NEXT, idx)
            else:
                self.r.free_head = self.r.free_next[prev]
                write_desc(self.r.desc + 16 * <uint32_t>prev, a, l, f, 0)
        drv_make_available(&self.r, head, <uint16_t>n)
        return head

    def _add_packed(self, list bufs, indirect_gpa):
        cdef uint32_t n = len(bufs), i, ndesc = 1 if indirect_gpa is not None else n
        cdef uint16_t buf_id, pos
        cdef char *table
        cdef char *d
        if self.r.num_free < ndesc:
            raise RingError(f"ring full: {self.r.num_free} free descriptors, chain needs {ndesc}")
        buf_id = <uint16_t>self.r.free_head
        self.r.free_head = self.r.free_next[buf_id]
        self.r.num_free -= ndesc
        drv_track(&self.r, buf_id, <uint16_t>ndesc)
        if indirect_gpa is not None:
            table = gpa_to_ptr(self.mem.table, indirect_gpa, 16 * <uint64_t>n)
            if table == NULL:
                raise RingError(f"indirect table at {indirect_gpa:#x} not in guest memory")
            for i in range(n):        # implicitly chained; only WRITE is valid there
                a, l, f = bufs[i]
                d = table + 16 * i
                vhu_write_once_u64(d, a)
                vhu_write_once_u32(d + 8, l)
                vhu_write_once_u16(d + 12, 0)
                vhu_write_once_u16(d + 14, f)
            bufs = [(indirect_gpa, 16 * n, DESC_F_INDIRECT)]
        for i in range(ndesc):
            a, l, f = bufs[i]
            pos = self.r.shadow_avail
            d = self.r.desc + 16 * <uint32_t>pos
            vhu_write_once_u64(d, a)
            vhu_write_once_u32(d + 8, l)
            vhu_write_once_u16(d + 12, buf_id)
            pk_drv_defer_flags(&self.r, pos, f | (DESC_F_NEXT if i + 1 < ndesc else 0))
            pk_advance(&self.r.shadow_avail, &self.r.avail_wrap, 1, self.r.size)
        return buf_id

    def add_slots(self, base_gpa, slot_bytes, length, *, writable=False, max_chains=None):
        """Fill the ring with single-buffer chains over fixed slots: the chain
        with head (split) or buffer id (packed) h gets [base_gpa + h *
        slot_bytes, +length). Up to max_chains (default: every free
        descriptor); returns how many. Invisible until publish."""
        cdef uint64_t limit = self.r.num_free if max_chains is None else int(max_chains)
        if not 0 < length <= 0xFFFFFFFF or not 0 <= slot_bytes <= 0xFFFFFFFF:
            raise ValueError("length must be a non-zero u32 and slot_bytes a u32")
        if limit == 0 or self.r.num_free == 0:
            return 0
        if gpa_to_ptr(self.mem.table, base_gpa,
                      <uint64_t>slot_bytes * (self.r.size - 1) + <uint64_t>length) == NULL:
            raise RingError(f"buffer slots from {base_gpa:#x} not inside one region of guest memory")
        if not drv_mem_ok(&self.r):
            raise RingError("driver ring no longer inside guest memory")
        return drv_add_slots(&self.r, base_gpa, slot_bytes, length,
                             DESC_F_WRITE if writable else 0, <uint32_t>min(limit, self.r.size))

    def publish(self):
        return drv_publish_avail(&self.r)

    def get_used(self, max_items=2**31):
        cdef int cap = min(int(max_items), self.r.size)
        cdef uint16_t *heads = <uint16_t *>malloc(max(cap, 1) * sizeof(uint16_t))
        cdef uint32_t *lens = <uint32_t *>malloc(max(cap, 1) * sizeof(uint32_t))
        cdef int n, i
        try:
            n = drv_reclaim(&self.r, heads, lens, cap)
            if n < 0:
                raise RingError("device returned a used id that is not in flight")
            return [(heads[i], lens[i]) for i in range(n)]
        finally:
            free(heads)
            free(lens)

    def disable_interrupts(self):
        drv_interrupts_off(&self.r)

    def enable_interrupts(self):
        return drv_interrupts_on(&self.r)


cdef void drv_interrupts_off(DrvRing *r) noexcept nogil:
    if r.packed:
        if drv_mem_ok(r):
            pk_drv_interrupts(r, False)
    elif not r.event_idx and drv_mem_ok(r):
        vhu_write_once_u16(r.avail + RING_FLAGS, AVAIL_F_NO_INTERRUPT)


cdef bint drv_interrupts_on(DrvRing *r) noexcept nogil:
    """Ask for interrupts again; True if used chains arrived meanwhile."""
    if not drv_mem_ok(r):
        return False
    if r.packed:
        return pk_drv_interrupts(r, True)
    if r.event_idx:
        vhu_write_once_u16(avail_entry(r.avail, <uint16_t>r.size), r.last_used)
    else:
        vhu_write_once_u16(r.avail + RING_FLAGS, 0)
    # Store (flags / used_event) then load (used->idx): full fence.
    vhu_fence_full()
    return vhu_load_acquire_u16(r.used + RING_IDX) != r.last_used


def bench_roundtrip(DriverRing drv not None, DeviceRing dev not None, uint64_t buf_gpa,
                    uint32_t pkt_len, uint64_t packets, uint32_t batch, uint32_t slot_bytes=2048):
    """The core ring path, as a benchmark: the driver keeps the ring full of
    single-descriptor pkt_len buffers (head h's buffer at buf_gpa + h *
    slot_bytes); the device pops `batch` chains, pushes them used and
    publishes once per batch. Returns packets moved."""
    cdef uint16_t heads[256]
    cdef uint32_t lens[256]
    cdef uint64_t done = 0
    cdef int k, got
    cdef DrvRing *d = &drv.r
    cdef DevRing *v = &dev.r
    if batch == 0 or batch > 256:
        raise ValueError("batch must be 1..256")
    if slot_bytes and slot_bytes < pkt_len:
        raise ValueError("slot_bytes must be 0 (one shared buffer) or at least pkt_len")
    if gpa_to_ptr(drv.mem.table, buf_gpa, <uint64_t>slot_bytes * (d.size - 1) + pkt_len) == NULL:
        raise ValueError("the buffer slots are not inside one region of guest memory")
    with nogil:
        while done < packets and drv_mem_ok(d):
            # Driver: refill every free slot, publish once.
            drv_add_slots(d, buf_gpa, slot_bytes, pkt_len, 0, d.size)
            drv_publish_avail(d)
            # Device: one batch.
            got = dev_pop_batch(v, batch)
            if got <= 0:
                break
            dev_push_popped(v, <uint32_t>got)
            dev_publish_used(v)
            done += <uint64_t>got
            # Driver: take the used chains back.
            k = drv_reclaim(d, heads, lens, 256)
            while k == 256:
                k = drv_reclaim(d, heads, lens, 256)
    return done
