# Packed virtqueues (virtio 1.1 section 2.8), device and driver side.
# Included into _ring.pyx: the dev_* / drv_* entry points branch here when
# the ring is packed, so compiled loops drive both layouts the same way.
#
# Layout: one descriptor ring (16 bytes each: le64 addr, le32 len, le16 id,
# le16 flags) that both sides write, plus two 4-byte event suppression
# areas (le16 off_wrap, le16 flags): the driver's (read by the device) and
# the device's (read by the driver). A descriptor is available when its
# AVAIL bit equals the driver's wrap counter and its USED bit does not;
# used when both equal the device's wrap counter. Each side only polls the
# next position in ring order, so flags are the synchronisation point:
# written last with release, read first with acquire.
#
# Trust model as for split rings: every flag, id, address and length the
# driver wrote is read once, checked, and a violation breaks this ring only.

cdef enum:
    PK_F_AVAIL = 1 << 7
    PK_F_USED = 1 << 15
    EVENT_ENABLE = 0           # event suppression flags (2.8.10)
    EVENT_DISABLE = 1
    EVENT_DESC = 2
    EVENT_OFF_WRAP = 0         # offsets in an event suppression area
    EVENT_FLAGS = 2


cdef inline bint pk_avail(uint16_t flags, uint16_t wrap) noexcept nogil:
    """Made available by the driver in the lap whose wrap counter is `wrap`."""
    return ((flags & PK_F_AVAIL) != 0) == (wrap != 0) and ((flags & PK_F_USED) != 0) != (wrap != 0)


cdef inline bint pk_used(uint16_t flags, uint16_t wrap) noexcept nogil:
    return ((flags & PK_F_AVAIL) != 0) == (wrap != 0) and ((flags & PK_F_USED) != 0) == (wrap != 0)


cdef inline bint pk_impossible(uint16_t flags, uint16_t wrap) noexcept nogil:
    """Driver side, at the next used position of a ring with buffers in
    flight: USED says "used in this lap" but AVAIL disagrees. A device sets
    both bits in one store (2.8.1), so only a broken device writes this."""
    return ((flags & PK_F_USED) != 0) == (wrap != 0) and ((flags & PK_F_AVAIL) != 0) != (wrap != 0)


cdef inline uint16_t pk_used_flags(uint16_t wrap, bint written) noexcept nogil:
    # 2.8.4: in a used descriptor, WRITE says whether the device wrote data.
    return (PK_F_AVAIL | PK_F_USED if wrap else 0) | (DESC_F_WRITE if written else 0)


cdef inline void pk_advance(uint16_t *pos, uint16_t *wrap, uint32_t n, uint32_t size) noexcept nogil:
    cdef uint32_t p = pos[0] + n
    if p >= size:
        p -= size
        wrap[0] ^= 1
    pos[0] = <uint16_t>p


cdef bint pk_need_event(uint16_t off_wrap, uint16_t old, uint16_t new, uint16_t wrap,
                        uint32_t size) noexcept nogil:
    """RING_EVENT_FLAGS_DESC: did the positions published since `old` (up to
    `new`, in the lap of `wrap`) pass the event offset? Offsets of another
    lap are moved back by the ring size, so the split ring's 16-bit
    need_event inequality applies unchanged."""
    cdef uint16_t off = off_wrap & 0x7FFF
    if new <= old:
        old = <uint16_t>(old - size)
    if wrap != (off_wrap >> 15):
        off = <uint16_t>(off - size)
    return need_event(off, new, old)


# -- device side --------------------------------------------------------------

cdef int pk_walk(DevRing *r, uint16_t pos, uint16_t wrap, uint16_t flags, ChainInfo *c,
                 uint32_t seg_base) noexcept nogil:
    """Translate the chain whose first descriptor (at pos, already seen
    available with `flags`) starts a buffer. 0, -1 (broken) or 1 (no space)."""
    cdef uint32_t ndesc = 0, nseg = seg_base, k, ntable
    cdef bint seen_writable = False
    cdef uint64_t addr
    cdef uint32_t dlen
    cdef uint16_t buf_id = 0, tflags
    cdef int rc
    cdef char *d
    cdef char *table
    c.seg_start = seg_base
    c.nread = c.nwrite = 0
    c.read_len = c.write_len = 0
    c.pos = pos
    c.wrap = wrap
    while True:
        d = r.desc + 16 * <uint32_t>pos
        if ndesc:
            # The driver exposes a chain's first descriptor last (2.8.6):
            # the rest must already be available in their lap.
            flags = vhu_load_acquire_u16(d + 14)
            if vhu_unlikely(not pk_avail(flags, wrap)):
                return dev_mark_broken(r, B_CHAIN_NOT_AVAILABLE)
        ndesc += 1
        if vhu_unlikely(ndesc > r.size):
            return dev_mark_broken(r, B_CHAIN_TOO_LONG)
        addr = vhu_read_once_u64(d)
        dlen = vhu_read_once_u32(d + 8)
        buf_id = vhu_read_once_u16(d + 12)
        if vhu_unlikely(flags & DESC_F_INDIRECT):
            if not r.indirect:
                return dev_mark_broken(r, B_INDIRECT_NOT_NEGOTIATED)
            if ndesc > 1 or flags & DESC_F_NEXT:
                return dev_mark_broken(r, B_INDIRECT_IN_CHAIN)
            if dlen == 0 or dlen % 16:
                return dev_mark_broken(r, B_INDIRECT_BAD_LEN)
            ntable = dlen // 16
            if ntable > r.size:
                return dev_mark_broken(r, B_CHAIN_TOO_LONG)
            table = gpa_to_ptr(r.table_ref[0], addr, dlen)
            if table == NULL:
                if gather(r.table_ref[0], addr, dlen, r.indirect_copy) < 0:
                    return dev_mark_broken(r, B_INDIRECT_UNMAPPED)
                table = r.indirect_copy
            # Table entries are implicitly chained; only WRITE is valid in them.
            # On a transmit queue (device_reads) WRITE is not looked at: the
            # device reads every buffer there. DPDK's virtio PMD marks the
            # header entry of each packed TX indirect table WRITE
            # (virtqueue.h, vring_desc_init_indirect_packed) and its data
            # entries readable; DPDK's vhost library maps table entries with
            # the ring's direction, so that driver never learned otherwise.
            for k in range(ntable):
                d = table + 16 * k
                tflags = vhu_read_once_u16(d + 14)
                if tflags & DESC_F_INDIRECT:
                    return dev_mark_broken(r, B_INDIRECT_NESTED)
                if r.device_reads:
                    tflags &= ~DESC_F_WRITE
                rc = add_buffer(r, c, vhu_read_once_u64(d), vhu_read_once_u32(d + 8),
                                tflags & DESC_F_WRITE, &seen_writable, &nseg, seg_base)
                if rc != 0:
                    return rc
            break
        rc = add_buffer(r, c, addr, dlen, flags & DESC_F_WRITE, &seen_writable, &nseg, seg_base)
        if rc != 0:
            return rc
        if not (flags & DESC_F_NEXT):
            break
        pk_advance(&pos, &wrap, 1, r.size)
    # The buffer id is the last descriptor's (2.8.6).
    if vhu_unlikely(buf_id >= r.size):
        return dev_mark_broken(r, B_BAD_ID)
    c.head = buf_id
    c.ndesc = <uint16_t>ndesc
    return 0


cdef int pk_pop_chains(DevRing *r, uint32_t max_chains) noexcept nogil:
    cdef uint32_t n = 0, nseg = 0, dlen
    cdef uint16_t pos = r.last_avail, wrap = r.avail_wrap, flags, buf_id
    cdef uint64_t addr, word
    cdef ChainInfo *c
    cdef MemTable *table
    cdef char *d
    cdef char *p
    cdef int rc
    cdef RegionHit hit
    # Locals: stores through guest pointers could alias the struct's
    # fields, so the compiler would reload them every iteration.
    cdef char *desc
    cdef ChainInfo *chains = r.chains
    cdef Seg *segs = r.segs
    cdef uint16_t *id_ndesc = r.id_ndesc
    cdef uint32_t size = r.size, max_segs = r.max_segs
    if r.broken or not dev_mem_ok(r):
        return 0
    desc = r.desc               # dev_mem_ok may have re-translated it
    table = r.table_ref[0]
    hit_load(&hit, table)
    if max_chains > r.max_chains:
        max_chains = r.max_chains
    while n < max_chains:
        d = desc + 16 * <uint32_t>pos
        # Acquire: the descriptor's other fields are read after its flags.
        flags = vhu_load_acquire_u16(d + 14)
        if not pk_avail(flags, wrap):
            break
        c = &chains[n]
        # Fast path: one descriptor, no NEXT/INDIRECT, inside one region.
        if vhu_likely((flags & (DESC_F_NEXT | DESC_F_INDIRECT)) == 0 and nseg < max_segs):
            addr = vhu_read_once_u64(d)
            word = vhu_read_once_u64(d + 8)      # len and id (flags, read above, ignored)
            dlen = <uint32_t>word
            buf_id = <uint16_t>(word >> 32)
            p = hit_translate(&hit, table, addr, dlen) if dlen != 0 and buf_id < size else NULL
            if vhu_likely(p != NULL):
                c.head = buf_id
                c.ndesc = 1
                c.pos = pos
                c.wrap = wrap
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
                id_ndesc[buf_id] = 1
                pk_advance(&pos, &wrap, 1, size)
                n += 1
                continue
        rc = pk_walk(r, pos, wrap, flags, c, nseg)
        if rc != 0:
            if rc < 0:
                return 0          # broken: nothing of this batch is handed out
            break                 # out of segment space: the rest next time
        id_ndesc[c.head] = c.ndesc
        pk_advance(&pos, &wrap, c.ndesc, size)
        nseg = c.seg_start + c.nread + c.nwrite
        n += 1
    VHU_ASSERT(nseg <= max_segs)
    r.last_avail = pos
    r.avail_wrap = wrap
    r.counters[C_POPPED] += n
    return n


cdef int pk_avail_pending(DevRing *r) noexcept nogil:
    """Chains available, counted by walking them (control paths only)."""
    cdef uint16_t pos = r.last_avail, wrap = r.avail_wrap, flags
    cdef uint32_t seen = 0, chains = 0
    if r.broken or not dev_mem_ok(r):
        return -1
    while seen < r.size:
        flags = vhu_load_acquire_u16(r.desc + 16 * <uint32_t>pos + 14)
        if not pk_avail(flags, wrap):
            break
        seen += 1
        if not (flags & DESC_F_NEXT) or flags & DESC_F_INDIRECT:
            chains += 1
        pk_advance(&pos, &wrap, 1, r.size)
    return chains


cdef void pk_push_used(DevRing *r, uint16_t buf_id, uint32_t written) noexcept nogil:
    # Kept aside until publish: a used descriptor overwrites a ring slot, and
    # a half-delivered mergeable frame must be undone without a trace.
    VHU_ASSERT(r.npend < r.size)
    if r.npend >= r.size:
        return
    r.pend_id[r.npend] = buf_id
    r.pend_len[r.npend] = written
    r.npend += 1


cdef inline uint16_t pk_write_first_used(char *d, uint16_t buf_id, uint32_t written,
                                         uint16_t wrap) noexcept nogil:
    """The slot the driver polls next: len and id now, and the flags it
    gets last (returned), with release, once the batch's other slots are in."""
    vhu_write_once_u32(d + 8, written)
    vhu_write_once_u16(d + 12, buf_id)
    return pk_used_flags(wrap, written != 0)


cdef bint pk_publish_used(DevRing *r) noexcept nogil:
    cdef uint32_t i, n = r.npend, npushed = r.npend, size = r.size
    cdef uint16_t pos = r.shadow_used, wrap = r.used_wrap, first_flags = 0, nd, old, ev_flags
    cdef uint16_t first_pos = r.shadow_used, buf_id
    cdef uint32_t written
    cdef char *d
    cdef char *desc
    cdef bint notify, valid
    # Locals: stores into the ring could alias the struct's fields.
    cdef uint16_t *pend_id = r.pend_id
    cdef uint32_t *pend_len = r.pend_len
    cdef uint16_t *id_ndesc = r.id_ndesc
    if n == 0 or not dev_mem_ok(r):
        return False
    desc = r.desc
    if r.batch_used:
        # IN_ORDER (2.8.21): one used descriptor, in the batch's first slot,
        # names the batch's last buffer; the driver returns every buffer up
        # to it and moves on by the batch's descriptors. On a transmit queue
        # nothing is written into the buffers, so no length is lost. The
        # other slots stay as the driver wrote them: lines the front-end's
        # CPU owns are left to it, one line changes hands a batch, not one
        # line every four frames.
        for i in range(n):
            nd = id_ndesc[pend_id[i]]
            pk_advance(&pos, &wrap, nd if nd else 1, size)
        first_flags = pk_write_first_used(desc + 16 * <uint32_t>first_pos, pend_id[n - 1],
                                          pend_len[n - 1], r.used_wrap)
        n = 0
    for i in range(n):
        d = desc + 16 * <uint32_t>pos
        buf_id = pend_id[i]
        written = pend_len[i]
        if i == 0:
            first_flags = pk_write_first_used(d, buf_id, written, wrap)
        else:
            # len, id and flags in one store: this slot is not the one the
            # driver polls next, so its order against the others is free.
            vhu_write_once_u64(d + 8, written | (<uint64_t>buf_id << 32)
                               | (<uint64_t>pk_used_flags(wrap, written != 0) << 48))
        nd = id_ndesc[buf_id]
        pk_advance(&pos, &wrap, nd if nd else 1, size)
    # Release: every used descriptor above is complete before the driver can
    # see the first one (it polls only the next position, in order).
    vhu_store_release_u16(r.desc + 16 * <uint32_t>first_pos + 14, first_flags)
    old = r.shadow_used
    r.shadow_used = pos
    r.used_wrap = wrap
    r.npend = 0
    # Where a replacement worker resumes (vhu.workers.supervisor): every
    # chain before this position is used, none after it is in flight.
    r.counters[C_POSITION] = pos | (<uint64_t>wrap << 15)
    r.counters[C_PUSHED] += npushed
    r.counters[C_PUBLISHED] += 1
    # Store (used flags) then load (driver event suppression): full fence.
    vhu_fence_full()
    ev_flags = vhu_read_once_u16(r.avail + EVENT_FLAGS) & 3
    valid = r.notify_valid       # `old` is meaningful once one publish has been checked
    r.notify_valid = True
    if not r.event_idx or ev_flags != EVENT_DESC:
        notify = ev_flags != EVENT_DISABLE
    else:
        notify = not valid or pk_need_event(vhu_read_once_u16(r.avail + EVENT_OFF_WRAP),
                                            old, pos, wrap, r.size)
    if notify:
        r.counters[C_NOTIFY] += 1
    else:
        r.counters[C_NOTIFY_SUPPRESSED] += 1
    return notify


cdef uint32_t pk_skip_batch(DevRing *r) noexcept nogil:
    """Resume (DeviceRing.resume) at a used slot a batching publish wrote
    (batch_used) before the position: the slot names the batch's last
    buffer, and the batch's other chains, which still look available, run
    up to the chain with that id. Skip the slot (one descriptor: its own
    flags are gone) and those chains; if no available chain carries the id
    (a batch of one), the slot alone. Bounded by the ring; a driver that
    gives a later chain the same id only loses its own frames (skipped as
    if sent). Returns the slots skipped."""
    cdef uint16_t last_id = vhu_read_once_u16(r.desc + 16 * <uint32_t>r.last_avail + 12)
    cdef uint16_t pos = r.last_avail, wrap = r.avail_wrap, flags
    cdef uint32_t k = 1
    pk_advance(&pos, &wrap, 1, r.size)
    while k < r.size:
        flags = vhu_load_acquire_u16(r.desc + 16 * <uint32_t>pos + 14)
        if not pk_avail(flags, wrap):
            break
        k += 1
        if not (flags & DESC_F_NEXT) and vhu_read_once_u16(r.desc + 16 * <uint32_t>pos + 12) == last_id:
            pk_advance(&pos, &wrap, 1, r.size)
            r.last_avail = pos
            r.avail_wrap = wrap
            return k
        pk_advance(&pos, &wrap, 1, r.size)
    pk_advance(&r.last_avail, &r.avail_wrap, 1, r.size)
    return 1


cdef void pk_notifications(DevRing *r, bint on) noexcept nogil:
    vhu_write_once_u16(r.used + EVENT_FLAGS, EVENT_ENABLE if on else EVENT_DISABLE)
    if vhu_unlikely(r.log != NULL):
        log_used_now(r, EVENT_FLAGS, 2)


cdef void pk_unpop(DevRing *r, uint32_t first_unused) noexcept nogil:
    """Rewind to the first stashed chain not used (its position and lap)."""
    r.last_avail = r.chains[first_unused].pos
    r.avail_wrap = r.chains[first_unused].wrap


# -- driver side --------------------------------------------------------------

cdef uint32_t pk_drv_add_slots(DrvRing *r, uint64_t base_gpa, uint32_t slot_bytes, uint32_t length,
                              uint16_t flags, uint32_t max_chains) noexcept nogil:
    """drv_add_slots for a packed ring: buffer id h's buffer at base_gpa +
    h * slot_bytes, at the next ring positions. Flags, which make a
    descriptor available, wait for publish (pk_drv_publish)."""
    cdef uint32_t n = 0, buf_id
    # Locals: stores into the shared ring could alias the struct's fields.
    cdef uint32_t free_head = r.free_head, num_free = r.num_free, size = r.size, npend = r.npend
    cdef uint16_t pos = r.shadow_avail, wrap = r.avail_wrap
    cdef uint16_t *free_next = r.free_next
    cdef uint16_t *pend_pos = r.pend_pos
    cdef uint16_t *pend_flags = r.pend_flags
    cdef char *desc = r.desc
    cdef char *d
    while n < max_chains and num_free:
        buf_id = free_head
        free_head = free_next[buf_id]
        num_free -= 1
        d = desc + 16 * <uint32_t>pos
        vhu_write_once_u64(d, base_gpa + <uint64_t>buf_id * slot_bytes)
        vhu_write_once_u32(d + 8, length)
        vhu_write_once_u16(d + 12, <uint16_t>buf_id)
        pend_pos[npend] = pos
        pend_flags[npend] = flags | (PK_F_AVAIL if wrap else PK_F_USED)
        npend += 1
        pk_advance(&pos, &wrap, 1, size)
        drv_track(r, <uint16_t>buf_id, 1)
        n += 1
    r.free_head = free_head
    r.num_free = num_free
    r.npend = npend
    r.shadow_avail = pos
    r.avail_wrap = wrap
    return n


cdef inline void pk_drv_defer_flags(DrvRing *r, uint16_t pos, uint16_t flags) noexcept nogil:
    """Flags (which make a descriptor available) wait for publish."""
    r.pend_pos[r.npend] = pos
    r.pend_flags[r.npend] = flags | (PK_F_AVAIL if r.avail_wrap else PK_F_USED)
    r.npend += 1


cdef bint pk_drv_publish(DrvRing *r) noexcept nogil:
    cdef uint32_t i, n = r.npend
    cdef uint16_t ev_flags, old = r.published_avail, new = r.shadow_avail
    # Locals: stores into the ring could alias the struct's fields.
    cdef char *desc = r.desc
    cdef uint16_t *pend_pos = r.pend_pos
    cdef uint16_t *pend_flags = r.pend_flags
    if n == 0:
        return False
    for i in range(1, n):
        vhu_write_once_u16(desc + 16 * <uint32_t>pend_pos[i] + 14, pend_flags[i])
    # Release: all descriptors of the batch are written before the first
    # one turns available (the device polls only the next position).
    vhu_store_release_u16(r.desc + 16 * <uint32_t>r.pend_pos[0] + 14, r.pend_flags[0])
    r.npend = 0
    r.published_avail = new
    # Store (flags) then load (device event suppression): full fence.
    vhu_fence_full()
    ev_flags = vhu_read_once_u16(r.used + EVENT_FLAGS) & 3
    if not r.event_idx or ev_flags != EVENT_DESC:
        return ev_flags != EVENT_DISABLE
    return pk_need_event(vhu_read_once_u16(r.used + EVENT_OFF_WRAP), old, new, r.avail_wrap,
                         r.size)


cdef int pk_drv_reclaim(DrvRing *r, uint16_t *heads, uint32_t *lens, int max_items) noexcept nogil:
    cdef int n = 0
    cdef uint16_t flags, buf_id, nd
    # Locals: stores into the shared ring could alias the struct's fields.
    cdef uint16_t pos = r.last_used, wrap = r.used_wrap
    cdef uint32_t num_free = r.num_free, size = r.size, free_head = r.free_head
    cdef char *desc = r.desc
    cdef char *d
    cdef int rc = 0
    # Only while buffers are in flight: a slot never written in this lap (a
    # resumed ring, or a fresh one past its first lap) reads as zero, which
    # looks used in a lap whose wrap counter is 0.
    while n < max_items and num_free < size:
        d = desc + 16 * <uint32_t>pos
        flags = vhu_load_acquire_u16(d + 14)
        if not pk_used(flags, wrap):
            if pk_impossible(flags, wrap):
                rc = -1
            break
        buf_id = vhu_read_once_u16(d + 12)
        if buf_id >= size or r.chain_len[buf_id] == 0:
            rc = -1
            break
        heads[n] = buf_id
        lens[n] = vhu_read_once_u32(d + 8) if flags & DESC_F_WRITE else 0
        nd = r.chain_len[buf_id]
        r.chain_len[buf_id] = 0     # no longer in flight
        pk_advance(&pos, &wrap, nd, size)
        num_free += nd
        r.free_next[buf_id] = <uint16_t>free_head
        free_head = buf_id
        n += 1
    r.last_used = pos
    r.used_wrap = wrap
    r.num_free = num_free
    r.free_head = free_head
    return rc if rc < 0 else n


cdef bint pk_drv_interrupts(DrvRing *r, bint on) noexcept nogil:
    """Driver event suppression; with on, True if used buffers arrived meanwhile."""
    vhu_write_once_u16(r.avail + EVENT_FLAGS, EVENT_ENABLE if on else EVENT_DISABLE)
    if not on:
        return False
    vhu_fence_full()
    return pk_used(vhu_load_acquire_u16(r.desc + 16 * <uint32_t>r.last_used + 14), r.used_wrap)
