# Included by _engine.pyx: what workers share with each other (issue 19).
#
# 1. The RX-ring lock. A port's queue pair is polled (its TX ring drained) by
#    one worker, but with --app switch or patch (or a stage) several workers
#    may deliver into its RX ring. Each of them maps the ring and keeps a
#    private DevRing for it; the ring's true position is the shared
#    C_POSITION word (vhu._ring: written at every publish), and the lock is
#    the shared C_RX_LOCK word beside it in the ring's counter row (the
#    master's stats memory, mapped by every worker):
#
#        0             free
#        worker + 1    held by that worker (the master reads the holder; the
#                      bits above 16 count that worker index's replacements)
#        LOCK_DEAD     its holder died; the master released it (supervisor)
#
#    Each start of a shared ring has an epoch (C_RX_EPOCH, numbered by the
#    master): its owner sets position and epoch under the lock (rx_begin),
#    and a binding delivers only into the start it was given (rx_lock).
#
#    A worker takes the lock at its first frame for the ring in a batch (one
#    compare-and-swap), reloads its private cursors from C_POSITION, enqueues
#    the batch's frames, publishes used->idx (which writes C_POSITION),
#    decides on the interrupt, and stores 0 (release). So one atomic pair per
#    ring per batch, none per frame. Under the lock every receive chain a
#    worker pops it also uses or gives back (dev_publish_used unpops the
#    stash): between holders, last_avail == used == C_POSITION.
#    A worker that finds the lock taken does not wait: the batch's frames for
#    that ring are copied into its backlog for the ring (BACKLOG_FRAMES,
#    BACKLOG_BYTES) and enqueued, in order and before any later frame, the
#    next time it gets the lock (retried every round). A full backlog drops
#    and counts rx_no_room. Contended batches count rx_contended.
#    Rings only one worker writes (one worker, or echo, sink, source) are
#    bound unshared and never touch the lock: today's lock-free path, chosen
#    at bind time.
#
# 2. The switch's MAC table, in memory shared by every worker (the master's
#    memfd, vhu.workers.shared.MacMemory): a station learned from a port
#    polled by one worker is found by the others. Open addressing with
#    MAC_PROBES linear probes; each slot is a word (mac << 16 | port + 1,
#    changed by compare-and-swap, so a reader never sees half an entry) and
#    the time it was last seen (a double, refreshed at most every
#    MAC_REFRESH seconds so that workers do not bounce its cache line for
#    every frame). Ageing as before: an entry not seen for mac_ageing is
#    ignored, and is the first to be replaced.
from vhu._ring cimport (dev_unpop_stash, dev_mem_ok, C_POSITION, C_RX_LOCK, C_RX_CONTENDED,
                        C_RX_EPOCH,
                        B_RING_UNMAPPED)
from vhu._barriers cimport (vhu_cas_acquire_u64, vhu_cas_relaxed_u64, vhu_store_release_u64,
                            vhu_load_acquire_u64, vhu_atomic_add_u64, vhu_read_once_u64,
                            vhu_read_once_u16,
                            vhu_write_once_u64)

cdef enum:
    BACKLOG_FRAMES = 256             # a whole batch (MAX_BATCH) of one ring fits
    BACKLOG_BYTES = 1 << 20
    MAC_SLOTS_SHARED = 4096          # == MAC_SLOTS (the engine's table size)
    MAC_PROBES_SHARED = 8

cdef uint64_t LOCK_DEAD = 0xFFFFFFFFFFFFFFFFULL
cdef double MAC_REFRESH = 1.0
LOCK_DEAD_WORD = LOCK_DEAD


cdef struct RxShare:
    # Per binding: how its RX ring is written.
    bint shared          # other workers deliver into it too: take the lock
    bint held            # this worker holds the lock (within one batch)
    bint busy            # the lock was taken by another worker this batch: backlog
    bint tap_write_only  # a TAP another worker reads: we only write frames into it
    uint64_t epoch       # the start of the ring this binding belongs to (0: unchecked)
    uint32_t n           # frames in the backlog
    uint32_t used        # their bytes in buf
    char *buf            # BACKLOG_BYTES, allocated at the first contention
    uint32_t off[BACKLOG_FRAMES]
    uint32_t len[BACKLOG_FRAMES]
    uint8_t has_hdr[BACKLOG_FRAMES]      # 1: hdr holds its offload fields (passed on)
    uint8_t hdr[BACKLOG_FRAMES * VNET_HDR_FIELDS]


cdef struct SharedMac:
    uint64_t word        # mac << 16 | (port + 1); 0: empty slot
    double seen          # CLOCK_MONOTONIC (the same clock in every worker)


cdef inline void rx_adopt(DevRing *r) noexcept nogil:
    """Reload the private cursors from the position the last holder
    published (called with the lock held)."""
    cdef uint64_t pos = vhu_read_once_u64(&r.counters[C_POSITION])
    if r.stash_n:
        dev_unpop_stash(r)
    r.npend = 0
    if r.packed:
        if (pos & 0x7FFF) >= r.size:
            dev_mark_broken(r, B_RING_UNMAPPED)
            return
        r.last_avail = r.shadow_used = r.published_used = <uint16_t>(pos & 0x7FFF)
        r.avail_wrap = r.used_wrap = <uint16_t>((pos >> 15) & 1)
    else:
        r.last_avail = r.shadow_used = r.published_used = <uint16_t>pos


cdef inline void rx_recover(DevRing *r) noexcept nogil:
    """The previous holder died holding the lock. If it died between storing
    used->idx and C_POSITION (two adjacent stores in dev_publish_used), the
    guest already sees the later index: resume there, as a replacement
    worker resumes a split ring at used->idx. Packed rings resume at
    C_POSITION (DeviceRing.resume's caveat applies)."""
    cdef uint16_t pos, used_idx
    if r.packed or not dev_mem_ok(r):
        return
    pos = <uint16_t>vhu_read_once_u64(&r.counters[C_POSITION])
    used_idx = vhu_read_once_u16(r.used + 2)
    if <uint16_t>(used_idx - pos) <= r.size:
        vhu_write_once_u64(&r.counters[C_POSITION], used_idx)


cdef inline int rx_lock(DevRing *r, uint64_t me, uint64_t epoch) noexcept nogil:
    """Take ring r's lock for worker word `me` (one CAS): 1, and the private
    cursors follow the ring; 0 if another worker holds it, or the ring's
    owner has not started this start (`epoch`) of it yet; -1 if the ring
    was started again since (this binding is stale: a front-end that left,
    its reset not yet applied here). epoch 0: not checked."""
    cdef uint64_t *w = &r.counters[C_RX_LOCK]
    cdef uint64_t was = 0, cur
    if not vhu_cas_acquire_u64(w, &was, me):
        if was != LOCK_DEAD or not vhu_cas_acquire_u64(w, &was, me):
            return 0
    if epoch:
        cur = vhu_read_once_u64(&r.counters[C_RX_EPOCH])
        if cur != epoch:
            vhu_store_release_u64(w, was)     # as found (LOCK_DEAD stays for the next holder)
            return -1 if <int64_t>(cur - epoch) > 0 else 0
    if was == LOCK_DEAD:
        rx_recover(r)
    rx_adopt(r)
    return 1


cdef inline bint rx_begin(DevRing *r, uint64_t me, uint64_t epoch, uint64_t position,
                          double timeout) noexcept nogil:
    """The owner starts a shared ring afresh: under its lock (waiting up to
    `timeout` for a holder to finish its batch), the ring's position and
    epoch are set, so no worker still running the previous start can
    publish over them (it finds a newer epoch and stops). False if the lock
    stayed taken (the position is set anyway: its holder is hung, and is
    being replaced)."""
    cdef uint64_t *w = &r.counters[C_RX_LOCK]
    cdef uint64_t was
    cdef double until = now() + timeout
    cdef bint took = False
    while True:
        was = 0
        if vhu_cas_acquire_u64(w, &was, me):
            took = True
            break
        if was == LOCK_DEAD and vhu_cas_acquire_u64(w, &was, me):
            took = True
            break
        if now() >= until:
            break
        sched_yield()
    vhu_write_once_u64(&r.counters[C_POSITION], position)
    vhu_write_once_u64(&r.counters[C_RX_EPOCH], epoch)
    if took:
        vhu_store_release_u64(w, 0)
    return took


cdef inline void rx_unlock(DevRing *r) noexcept nogil:
    """Give the lock back (after dev_publish_used: nothing popped is kept)."""
    if r.stash_n:
        dev_unpop_stash(r)
    vhu_store_release_u64(&r.counters[C_RX_LOCK], 0)


cdef inline bint backlog_push(RxShare *s, const Seg *src, uint32_t nsrc, uint64_t skip,
                              int64_t length, const uint8_t *vnet_hdr) noexcept nogil:
    """Copy a frame (and its virtio-net header's offload fields, NULL: none)
    into the backlog; False if it is full (the caller counts the drop)."""
    cdef Seg d
    if s.buf == NULL:
        s.buf = <char *>malloc(BACKLOG_BYTES)
        if s.buf == NULL:
            return False
    if s.n >= BACKLOG_FRAMES or s.used + <uint64_t>length > BACKLOG_BYTES:
        return False
    d.ptr = s.buf + s.used
    d.len = <uint32_t>length
    copy_segs(&d, 1, 0, src, nsrc, skip, <uint64_t>length)
    s.off[s.n] = s.used
    s.len[s.n] = <uint32_t>length
    s.has_hdr[s.n] = vnet_hdr != NULL
    if vnet_hdr != NULL:
        memcpy(&s.hdr[s.n * VNET_HDR_FIELDS], vnet_hdr, VNET_HDR_FIELDS)
    s.n += 1
    s.used += (<uint32_t>length + 63) & ~<uint32_t>63
    return True


# -- the shared MAC table -------------------------------------------------------

cdef inline uint64_t mac_word(uint64_t mac, int port) noexcept nogil:
    return (mac << 16) | <uint64_t>(port + 1)


cdef inline int smac_lookup(SharedMac *t, uint64_t mac, double t_now, double ageing) noexcept nogil:
    cdef uint32_t h = mac_hash(mac), k
    cdef SharedMac *e
    cdef uint64_t w
    for k in range(MAC_PROBES_SHARED):
        e = &t[(h + k) & (MAC_SLOTS_SHARED - 1)]
        w = vhu_read_once_u64(&e.word)
        if w and (w >> 16) == mac:
            return <int>(w & 0xFFFF) - 1 if t_now - e.seen < ageing else -1
    return -1


cdef inline void smac_learn(SharedMac *t, uint64_t mac, int port, double t_now) noexcept nogil:
    cdef uint32_t h = mac_hash(mac), k
    cdef SharedMac *e
    cdef SharedMac *victim = NULL
    cdef uint64_t w, vw = 0, want = mac_word(mac, port)
    cdef int attempt
    for attempt in range(2):
        victim = NULL
        for k in range(MAC_PROBES_SHARED):
            e = &t[(h + k) & (MAC_SLOTS_SHARED - 1)]
            w = vhu_read_once_u64(&e.word)
            if w and (w >> 16) == mac:
                if w != want:
                    # A station that moved is followed at once (whoever wins a
                    # race of two workers, the later frame rewrites it).
                    vhu_cas_relaxed_u64(&e.word, &w, want)
                if t_now - e.seen >= MAC_REFRESH:
                    e.seen = t_now
                return
            if w == 0:
                if victim == NULL or vw != 0:
                    victim = e                # the first empty slot
                    vw = 0
            elif victim == NULL or (vw != 0 and e.seen < victim.seen):
                victim = e                    # else the least recently seen
                vw = w
        # New station: claim the slot only if nobody changed it since we
        # looked; if someone did (perhaps learning this same station), look again.
        e = victim
        w = vw
        e.seen = t_now
        if vhu_cas_relaxed_u64(&e.word, &w, want):
            return


cdef inline void smac_forget_port(SharedMac *t, int port) noexcept nogil:
    cdef uint32_t i
    cdef uint64_t w
    for i in range(MAC_SLOTS_SHARED):
        w = vhu_read_once_u64(&t[i].word)
        if w and <int>(w & 0xFFFF) - 1 == port:
            vhu_cas_relaxed_u64(&t[i].word, &w, 0)


MAC_TABLE_BYTES = MAC_SLOTS_SHARED * sizeof(SharedMac)


def rx_lock_hold(DeviceRing ring, int worker, double seconds):
    """Take `ring`'s RX lock as worker `worker` would, keep it `seconds`
    (spinning: a worker descheduled inside its batch), give it back without
    delivering anything. False if another holder had it. For tests (a slow
    holder) and perf/ (the lock's cost); the engine never calls it."""
    cdef DevRing *r = ring.ring()
    cdef double until
    cdef bint took
    with nogil:
        took = rx_lock(r, <uint64_t>worker + 1, 0) > 0
        if took:
            until = now() + seconds
            while now() < until:
                pass
            rx_unlock(r)
    return took


def rx_lock_cost(DeviceRing ring, int worker, uint64_t rounds):
    """Nanoseconds per uncontended take + give back of `ring`'s RX lock
    (with the cursor reload), measured over `rounds` pairs (perf/)."""
    cdef DevRing *r = ring.ring()
    cdef uint64_t i
    cdef double t0, t1
    with nogil:
        t0 = now()
        for i in range(rounds):
            if rx_lock(r, <uint64_t>worker + 1, 0) <= 0:
                break
            rx_unlock(r)
        t1 = now()
    return (t1 - t0) / rounds * 1e9
