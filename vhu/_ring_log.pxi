# Dirty-page logging for live migration (vhost-user "Migration"), device side.
# Included into _ring.pyx.
#
# While the front-end has VHOST_F_LOG_ALL on, every byte the device writes
# into guest memory must have the bit of its 4 KiB guest-physical page set in
# the log (a bitmap shared with the front-end, which clears bits while we set
# them: atomic OR). What the device writes, and where it is logged:
#   - RX buffers (virtio-net header and payload, every chain of a merged
#     frame): the pages of each popped chain's writable buffers, at most the
#     header plus MAX_FRAME_LEN bytes of them (all a frame can fill),
#     collected when the chain is popped; chains popped but given back are
#     marked too (harmless: a clean page sent twice);
#   - split used ring (entries, idx, flags, avail_event) and the packed
#     device event area: at log_guest_addr, when SET_VRING_ADDR carried
#     VHOST_VRING_F_LOG (the spec's rule for the used ring);
#   - packed descriptors written back as used: the descriptor ring's pages,
#     found through the memory table (the front-end gives no log address).
#
# Cost. Nothing of this runs while log is NULL but one predictable branch
# per pop and per publish (never per frame): the pop and publish loops are
# the same loops as without logging. Pages are collected into a per-ring
# list (consecutive repeats skipped) and marked once per batch, at publish,
# after one release fence: the data is visible before any of its bits, or
# the front-end could clear a bit, copy the page and miss our write.
#
# Trust. The collection only reads what the pop already checked (segments
# are inside the memory table); a bit beyond the log's size is not set (a
# front-end whose log is too small loses those pages, nobody else). More
# pages than the list holds (huge or many buffers, only a hostile driver)
# marks every mapped page instead: correct, bounded by the mapped memory.

cdef enum:
    LOG_PAGE_SHIFT = 12             # VHOST_LOG_PAGE 0x1000
    LOG_MAX_DIRTY = 8192            # pages collected per ring between two publishes

cdef uint64_t LOG_NO_PAGE = 0xFFFFFFFFFFFFFFFFULL


cdef inline void log_page(DevRing *r, uint64_t page) noexcept nogil:
    if page == r.last_page:
        return
    if r.ndirty >= r.max_dirty:
        r.dirty_all = True
        return
    r.dirty[r.ndirty] = page
    r.ndirty += 1
    r.last_page = page


cdef void log_gpa_range(DevRing *r, uint64_t gpa, uint64_t length) noexcept nogil:
    """Collect the pages of [gpa, gpa+length)."""
    cdef uint64_t first, last, p
    if length == 0 or r.dirty_all:
        return
    if gpa + length - 1 < gpa:
        length = 0 - gpa            # clipped at 2**64: pages past the log are dropped anyway
    first = gpa >> LOG_PAGE_SHIFT
    last = (gpa + length - 1) >> LOG_PAGE_SHIFT
    if last - first >= r.max_dirty:
        r.dirty_all = True
        return
    p = first
    while True:
        log_page(r, p)
        if p == last:
            break
        p += 1


cdef void log_host_range(DevRing *r, const char *p, uint64_t length) noexcept nogil:
    """Collect the pages of our local [p, p+length), which lies in guest
    memory (a segment, a ring part): local address back to guest-physical."""
    cdef MemTable *t = r.table_ref[0]
    cdef Region *g = NULL
    cdef int i
    cdef uint64_t off, n
    while length:
        g = NULL
        i = r.log_hit
        if 0 <= i < t.n and <uintptr_t>p - <uintptr_t>t.regions[i].host < t.regions[i].size:
            g = &t.regions[i]
        else:
            for i in range(t.n):
                if <uintptr_t>p - <uintptr_t>t.regions[i].host < t.regions[i].size:
                    g = &t.regions[i]
                    r.log_hit = i
                    break
        if g == NULL:
            return                  # not guest memory: nothing of the guest's to log
        off = <uintptr_t>p - <uintptr_t>g.host
        n = g.size - off
        if n > length:
            n = length
        log_gpa_range(r, g.gpa + off, n)
        p += n
        length -= n


cdef void log_popped(DevRing *r, uint32_t n) noexcept nogil:
    """Collect the writable buffers of chains[0..n) just popped: all the
    device may write into them (header + MAX_FRAME_LEN bytes at most)."""
    cdef uint32_t i, j
    cdef uint64_t left, k
    cdef ChainInfo *c
    cdef Seg *s
    for i in range(n):
        c = &r.chains[i]
        left = <uint64_t>r.hdr_len + MAX_FRAME_LEN
        for j in range(c.nwrite):
            if left == 0:
                break
            s = &r.segs[c.seg_start + c.nread + j]
            k = s.len if s.len < left else left
            log_host_range(r, s.ptr, k)
            left -= k


cdef void log_used_range(DevRing *r, uint64_t offset, uint64_t length) noexcept nogil:
    """Collect bytes [offset, offset+length) of the used ring (split) or the
    device event area (packed), at log_guest_addr, if the front-end asked."""
    if r.log_used:
        log_gpa_range(r, r.log_used_gpa + offset, length)


cdef void log_split_used(DevRing *r, uint16_t old, uint16_t new) noexcept nogil:
    """Used entries [old, new) and used->idx, just published."""
    cdef uint32_t first = old & r.mask, count = <uint16_t>(new - old)
    if count > r.size:
        count = r.size
    log_used_range(r, RING_IDX, 2)
    if first + count <= r.size:
        log_used_range(r, RING_ENTRIES + 8 * <uint64_t>first, 8 * <uint64_t>count)
    else:
        log_used_range(r, RING_ENTRIES + 8 * <uint64_t>first, 8 * <uint64_t>(r.size - first))
        log_used_range(r, RING_ENTRIES, 8 * <uint64_t>(first + count - r.size))


cdef void log_packed_used(DevRing *r, uint16_t first_pos, uint16_t pos) noexcept nogil:
    """Descriptor slots from first_pos up to pos (at least one, at most a
    whole lap), just written back as used."""
    cdef uint32_t count = pos - first_pos if pos > first_pos else pos + r.size - first_pos
    if first_pos + count <= r.size:
        log_host_range(r, r.desc + 16 * <uint32_t>first_pos, 16 * <uint64_t>count)
    else:
        log_host_range(r, r.desc + 16 * <uint32_t>first_pos, 16 * <uint64_t>(r.size - first_pos))
        log_host_range(r, r.desc, 16 * <uint64_t>(first_pos + count - r.size))


cdef inline uint64_t log_set(DevRing *r, uint64_t page) noexcept nogil:
    """Set one page's bit (1), or not when the log is too small for it (0)."""
    if page < (r.log_size << 3):
        vhu_log_or_u8(r.log + (page >> 3), <uint8_t>(1 << (page & 7)))
        return 1
    return 0


cdef uint64_t log_mark_all(DevRing *r) noexcept nogil:
    """Every page of every region (and the used ring): the list overflowed."""
    cdef MemTable *t = r.table_ref[0]
    cdef int i
    cdef uint64_t p, last, marked = 0, limit = r.log_size << 3
    for i in range(t.n):
        p = t.regions[i].gpa >> LOG_PAGE_SHIFT
        last = (t.regions[i].gpa + t.regions[i].size - 1) >> LOG_PAGE_SHIFT
        if last >= limit:
            if limit == 0:
                continue
            last = limit - 1
        while p <= last:
            if (p & 7) == 0 and p + 7 <= last:
                vhu_log_or_u8(r.log + (p >> 3), 0xFF)      # a whole byte at once
                p += 8
                marked += 8
            else:
                marked += log_set(r, p)
                p += 1
    if r.log_used and r.part_len[2]:
        p = r.log_used_gpa >> LOG_PAGE_SHIFT
        last = (r.log_used_gpa + r.part_len[2] - 1) >> LOG_PAGE_SHIFT
        while p <= last:
            marked += log_set(r, p)
            p += 1
    return marked


cdef void log_discard(DevRing *r) noexcept nogil:
    r.ndirty = 0
    r.dirty_all = False
    r.last_page = LOG_NO_PAGE


cdef void log_flush(DevRing *r) noexcept nogil:
    """Mark every collected page (after the data: release fence first)."""
    cdef uint32_t i, n = r.ndirty
    cdef uint64_t marked = 0, page, limit = r.log_size << 3
    cdef uint64_t *dirty = r.dirty
    cdef uint8_t *log = r.log
    if n == 0 and not r.dirty_all:
        return
    vhu_fence_release()
    if r.dirty_all:
        marked = log_mark_all(r)
    else:
        for i in range(n):
            page = dirty[i]
            if page < limit:
                vhu_log_or_u8(log + (page >> 3), <uint8_t>(1 << (page & 7)))
                marked += 1
    r.counters[C_LOG_PAGES] += marked
    log_discard(r)


cdef void log_used_now(DevRing *r, uint64_t offset, uint64_t length) noexcept nogil:
    """A used-ring / device-area field written outside a batch (notification
    flags, avail_event): marked at once. The pages the current batch
    collected stay collected (their data may not be written yet)."""
    cdef uint64_t p, last
    if not r.log_used or length == 0:
        return
    vhu_fence_release()
    p = (r.log_used_gpa + offset) >> LOG_PAGE_SHIFT
    last = (r.log_used_gpa + offset + length - 1) >> LOG_PAGE_SHIFT
    while p <= last:
        r.counters[C_LOG_PAGES] += log_set(r, p)
        p += 1


# Packed rings: the logging variants wrap the loops (left as they are).

cdef int log_pk_pop_chains(DevRing *r, uint32_t max_chains) noexcept nogil:
    cdef int n = pk_pop_chains(r, max_chains)
    if n > 0:
        log_popped(r, <uint32_t>n)
    return n


cdef bint log_pk_publish_used(DevRing *r) noexcept nogil:
    """pk_publish_used, then the descriptors it wrote back and every page
    collected, marked (after its release store: data before bits)."""
    cdef uint16_t first_pos = r.shadow_used
    cdef bint notify = False
    if r.npend and dev_mem_ok(r):
        notify = pk_publish_used(r)
        log_packed_used(r, first_pos, r.shadow_used)
    # Nothing used, a merged frame that found no room midway may still have
    # written into buffers it gave back: marked too (harmless).
    log_flush(r)
    return notify
