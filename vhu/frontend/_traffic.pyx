# cython: language_level=3
"""The front-end's data path: one compiled loop over its queue pairs.

Python (vhu.frontend) sets up memory, rings and eventfds, then calls
Traffic.run() for a slice of time (a second, for the rate lines); the loop
runs without the GIL and creates no Python object per packet.

Each ring's buffers are fixed slots: slot i of a ring belongs to descriptor
head i (split) or buffer id i (packed): drv_add_slots puts each chain's
buffer in its own slot, and drv_add_one always takes the free-list head,
which loop mode reads just before adding. So a used element names its
buffer without any lookup table.

Modes:
  tx    keep the TX rings full of --pkt-size frames (written once per slot)
  rx    keep the RX rings stocked, count what arrives
  loop  send numbered frames, check each one that comes back byte for byte
        (sequence numbers per queue: missing, out of order, corrupt)

Frame layout (after the virtio-net header): Ethernet dst, src, type 0x88B5
(IEEE local experimental), then u64 sequence number, u16 queue index, then
a payload pattern that depends on the sequence number's low byte, so a
frame delivered into the wrong slot or with a stale payload is caught.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memset, memcpy, memcmp
from libc.errno cimport errno, EINTR
from posix.unistd cimport read, write
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from vhu._barriers cimport vhu_likely, vhu_unlikely, vhu_read_once_u16
from vhu._mem cimport GuestMemory, gpa_to_ptr
from vhu._ring cimport (DriverRing, DrvRing, DESC_F_WRITE, drv_mem_ok, drv_add_one, drv_add_slots,
                        drv_publish_avail, drv_reclaim, drv_interrupts_off, drv_interrupts_on)
from vhu._sys cimport pollfd, poll, POLLIN, signal_eventfd, drain_eventfd, now_ns

MODES = ("tx", "rx", "loop")
POLL_MODES = ("busy", "adaptive")
cdef enum:
    SEQ_OFFSET = 14          # u64 sequence number
    QID_OFFSET = 22          # u16 queue index
    PATTERN_OFFSET = 24
    MIN_FRAME = 60           # an Ethernet frame without FCS
ETHERTYPE = 0x88B5
FRAME_LAYOUT = {"seq": SEQ_OFFSET, "queue": QID_OFFSET, "pattern": PATTERN_OFFSET}
MIN_PKT_SIZE = MIN_FRAME
COUNTER_NAMES = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "corrupt",
                 "missing", "out_of_order", "kicks")

cdef enum:
    M_TX = 0
    M_RX = 1
    M_LOOP = 2
    MAX_BURST = 256
    # counters, same order as COUNTER_NAMES
    K_TX_PACKETS = 0
    K_TX_BYTES
    K_RX_PACKETS
    K_RX_BYTES
    K_CORRUPT
    K_MISSING
    K_OUT_OF_ORDER
    K_KICKS
    K_COUNT


cdef struct Queue:
    DrvRing *tx
    DrvRing *rx
    int tx_kick, rx_kick, tx_call, rx_call
    char *tx_buf                # local address of TX slot 0; slots are tx_slot bytes apart
    uint64_t tx_gpa
    char *rx_buf
    uint64_t rx_gpa
    uint64_t next_seq           # loop: next sequence number to send
    uint64_t expect_seq         # loop: next one expected back
    uint32_t rx_rest            # buffers still to come of a merged (num_buffers > 1) frame
    uint64_t window_since       # loop: when the window was first seen full at ...
    uint64_t window_seq         # ... this expect_seq (0: not full)
    uint64_t c[K_COUNT]


cdef inline void kick(int fd, uint64_t *kicks) noexcept nogil:
    if signal_eventfd(fd):
        kicks[0] += 1


cdef inline void put_u64(char *p, uint64_t v) noexcept nogil:
    cdef int i
    for i in range(8):
        p[i] = <char>((v >> (8 * i)) & 0xFF)


cdef inline uint64_t get_u64(const char *p) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(8):
        v |= <uint64_t>(<uint8_t>p[i]) << (8 * i)
    return v


cdef class Traffic:
    """The data path over Q queue pairs. Built by vhu.frontend.Frontend once its
    rings are started; keeps the rings and the memory alive."""
    cdef Queue *q
    cdef int nq
    cdef int mode
    cdef bint adaptive
    cdef uint32_t batch, hdr_len, pkt_size, tx_slot, rx_slot, idle_spins
    cdef bint mergeable
    cdef uint32_t max_nbufs     # most buffers a received frame took so far
    cdef uint64_t loss_ns       # loop: a full window with nothing back for this long is lost
    cdef char *templates        # 256 frames of pkt_size bytes (index: sequence & 0xFF)
    cdef uint64_t limit         # total frames to send (tx/loop) or receive (rx); 0: no limit
    cdef uint64_t sent_total
    cdef readonly bint sending  # False once stop_sending() ran or the limit was reached
    cdef object keep            # the rings and memory the pointers lead into

    def __cinit__(self):
        self.q = NULL
        self.templates = NULL

    def __dealloc__(self):
        free(self.q)
        free(self.templates)

    def __init__(self, GuestMemory mem not None, list queues, str mode, *, uint32_t pkt_size,
                 uint32_t hdr_len, bint mergeable, uint32_t tx_slot, uint32_t rx_slot,
                 uint32_t batch=32, str poll="busy", uint64_t count=0, uint32_t idle_spins=2000,
                 double loss_timeout=0.2):
        """queues: [(tx DriverRing, rx DriverRing, tx_kick, rx_kick, tx_call, rx_call,
        tx_buf_gpa, rx_buf_gpa)], one per queue pair."""
        cdef int i, s, j
        cdef DriverRing tx, rx
        cdef Queue *qq
        cdef char *t
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        if poll not in POLL_MODES:
            raise ValueError(f"poll {poll!r}: one of {', '.join(POLL_MODES)}")
        if not 1 <= batch <= MAX_BURST:
            raise ValueError(f"batch {batch}: 1..{MAX_BURST}")
        if pkt_size < MIN_FRAME or hdr_len + pkt_size > tx_slot or hdr_len + pkt_size > rx_slot:
            raise ValueError(f"packet size {pkt_size} does not fit the buffer slots")
        self.mode = MODES.index(mode)
        self.adaptive = poll == "adaptive"
        self.batch, self.hdr_len, self.pkt_size = batch, hdr_len, pkt_size
        self.mergeable = mergeable
        self.max_nbufs = 1
        self.loss_ns = <uint64_t>(loss_timeout * 1e9)
        self.tx_slot, self.rx_slot, self.idle_spins = tx_slot, rx_slot, idle_spins
        self.limit, self.sent_total, self.sending = count, 0, mode != "rx"
        self.nq = len(queues)
        self.q = <Queue *>calloc(max(self.nq, 1), sizeof(Queue))
        self.templates = <char *>malloc(256 * <size_t>pkt_size)
        if self.q == NULL or self.templates == NULL:
            raise MemoryError()
        self.keep = (mem, queues)
        # Templates: Ethernet header (locally administered MACs), zero sequence
        # and queue fields (filled per frame), then the pattern for each low byte.
        for s in range(256):
            t = self.templates + s * <size_t>pkt_size
            memset(t, 0, pkt_size)
            memcpy(t, b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5", 14)
            for j in range(PATTERN_OFFSET, pkt_size):
                t[j] = <char>((s * 31 + j) & 0xFF)
        for i in range(self.nq):
            tx, rx = queues[i][0], queues[i][1]
            qq = &self.q[i]
            qq.tx, qq.rx = &tx.r, &rx.r
            qq.tx_kick, qq.rx_kick, qq.tx_call, qq.rx_call = queues[i][2:6]
            qq.tx_gpa, qq.rx_gpa = queues[i][6], queues[i][7]
            qq.tx_buf = gpa_to_ptr(mem.table, qq.tx_gpa, <uint64_t>tx_slot * qq.tx.size)
            qq.rx_buf = gpa_to_ptr(mem.table, qq.rx_gpa, <uint64_t>rx_slot * qq.rx.size)
            if qq.tx_buf == NULL or qq.rx_buf == NULL:
                raise ValueError(f"queue pair {i}: buffer slots not inside the front-end's memory")
            if self.mode == M_TX:
                # Written once: a tx slot's frame never changes (as testpmd txonly).
                for s in range(<int>qq.tx.size):
                    self._fill(qq, s, s, i)
            drv_interrupts_off(qq.tx)
            drv_interrupts_off(qq.rx)

    cdef inline void _fill(self, Queue *qq, uint32_t slot, uint64_t seq, int qid) noexcept nogil:
        cdef char *p = qq.tx_buf + <size_t>slot * self.tx_slot
        memset(p, 0, self.hdr_len)           # no offloads; num_buffers is 0 on TX
        memcpy(p + self.hdr_len, self.templates + (seq & 0xFF) * <size_t>self.pkt_size,
               self.pkt_size)
        put_u64(p + self.hdr_len + SEQ_OFFSET, seq)
        p[self.hdr_len + QID_OFFSET] = <char>(qid & 0xFF)
        p[self.hdr_len + QID_OFFSET + 1] = <char>(qid >> 8)

    def counters(self):
        """Totals over the queue pairs, by COUNTER_NAMES."""
        cdef int i, k
        out = dict.fromkeys(COUNTER_NAMES, 0)
        for i in range(self.nq):
            for k in range(K_COUNT):
                out[COUNTER_NAMES[k]] += self.q[i].c[k]
        return out

    def queue_counters(self, int i):
        if not 0 <= i < self.nq:
            raise IndexError(i)
        return {COUNTER_NAMES[k]: self.q[i].c[k] for k in range(K_COUNT)}

    def in_flight(self):
        """TX frames the device has not returned yet, and (loop) frames not back."""
        cdef int i
        cdef uint64_t tx = 0, loop = 0
        for i in range(self.nq):
            tx += self.q[i].tx.size - self.q[i].tx.num_free
            if self.mode == M_LOOP:
                loop += self.q[i].next_seq - self.q[i].expect_seq
        return tx, loop

    def done(self):
        """The --count limit is reached and every frame is complete (and, for tx
        and loop, back from the device)."""
        return self._done()

    def stop_sending(self):
        self.sending = False

    def finish(self):
        """Loop mode, after the drain: what never came back is missing."""
        cdef int i
        if self.mode == M_LOOP:
            for i in range(self.nq):
                self.q[i].c[K_MISSING] += self.q[i].next_seq - self.q[i].expect_seq
                self.q[i].expect_seq = self.q[i].next_seq

    def run(self, double seconds):
        """Move frames for up to `seconds` (returns early when a --count limit is
        reached and everything came back). Returns -1 if a ring is broken
        (the back-end returned an id not in flight), else 0."""
        cdef uint64_t deadline = now_ns() + <uint64_t>(max(seconds, 0.0) * 1e9)
        cdef int rc = 0, i, n
        cdef uint32_t idle = 0, spins = 0
        with nogil:
            while True:
                n = 0
                for i in range(self.nq):
                    rc = self._step(&self.q[i], i)
                    if rc < 0:
                        break
                    n += rc
                if rc < 0:
                    break
                if n:
                    idle = 0
                else:
                    idle += 1
                    if self._done():
                        break
                spins += 1
                if spins >= 64 or idle:
                    spins = 0
                    if now_ns() >= deadline:
                        break
                if self.adaptive and idle >= self.idle_spins:
                    self._sleep(deadline)
                    idle = 0
        return -1 if rc < 0 else 0

    cdef bint _done(self) noexcept nogil:
        """Nothing left to do: the limit was reached and every frame is back."""
        cdef int i
        if self.limit == 0:
            return False
        if self.mode == M_RX:
            for i in range(self.nq):
                if self.q[i].rx_rest:
                    return False      # the rest of a merged frame is still to come
            return self._rx_total() >= self.limit
        if self.sending:
            return False
        for i in range(self.nq):
            if self.q[i].tx.num_free != self.q[i].tx.size:
                return False
            if self.mode == M_LOOP and self.q[i].next_seq != self.q[i].expect_seq:
                return False
        return True

    cdef uint64_t _rx_total(self) noexcept nogil:
        cdef uint64_t t = 0
        cdef int i
        for i in range(self.nq):
            t += self.q[i].c[K_RX_PACKETS]
        return t

    cdef uint64_t _rx_posted(self) noexcept nogil:
        cdef uint64_t t = 0
        cdef int i
        for i in range(self.nq):
            t += self.q[i].rx.size - self.q[i].rx.num_free
        return t

    cdef int _step(self, Queue *qq, int qid) noexcept nogil:
        """One burst each way on one queue pair; work done (frames), or -1."""
        cdef int n = 0, k
        # RX first: its ring is stocked before the first TX frame is visible,
        # so an echoing back-end never finds it empty.
        if self.mode != M_TX:
            k = self._rx(qq, qid)
            if k < 0:
                return -1
            n += k
        if self.mode != M_RX:
            k = self._tx(qq, qid)
            if k < 0:
                return -1
            n += k
        return n

    cdef int _tx(self, Queue *qq, int qid) noexcept nogil:
        cdef uint16_t heads[MAX_BURST]
        cdef uint32_t lens[MAX_BURST]
        cdef DrvRing *r = qq.tx
        cdef int got, added = 0
        cdef uint32_t slot, window
        cdef uint64_t want
        if not drv_mem_ok(r):
            return -1
        got = drv_reclaim(r, heads, lens, MAX_BURST)
        if got < 0:
            return -1
        qq.c[K_TX_PACKETS] += <uint64_t>got
        qq.c[K_TX_BYTES] += <uint64_t>got * self.pkt_size
        if self.mode == M_TX and self.sending:
            # Slots are written once: the ring is refilled with no per-frame work.
            want = self.batch
            if self.limit and self.limit - self.sent_total < want:
                want = self.limit - self.sent_total
            added = <int>drv_add_slots(r, qq.tx_gpa, self.tx_slot, self.hdr_len + self.pkt_size,
                                       0, <uint32_t>want)
            self.sent_total += <uint64_t>added
            if self.limit and self.sent_total >= self.limit:
                self.sending = False
        # Loop mode: each frame is numbered as it goes out.
        while self.mode == M_LOOP and self.sending and added < <int>self.batch and r.num_free > 0:
            if self.limit and self.sent_total >= self.limit:
                self.sending = False
                break
            slot = r.free_head             # the head (split) or buffer id (packed) drv_add_one takes
            # At most an RX ring's worth in flight: the echo always has room.
            window = qq.rx.size
            if qq.next_seq - qq.expect_seq >= window:
                self._window_full(qq)
                break
            self._fill(qq, slot, qq.next_seq, qid)
            qq.next_seq += 1
            if drv_add_one(r, qq.tx_gpa + <uint64_t>slot * self.tx_slot,
                           self.hdr_len + self.pkt_size, 0) < 0:
                break
            added += 1
            self.sent_total += 1
        if added and drv_publish_avail(r):
            kick(qq.tx_kick, &qq.c[K_KICKS])
        return got + added

    cdef void _window_full(self, Queue *qq) noexcept nogil:
        """Loop mode, nothing may be sent: if nothing came back for loss_ns, the
        frames out are lost (a peer that dropped a whole window would stall the
        run for good): count them missing and reopen the window. Should they
        come back after all, they count as out of order."""
        cdef uint64_t now = now_ns()
        if qq.window_since == 0 or qq.window_seq != qq.expect_seq:
            qq.window_since, qq.window_seq = now, qq.expect_seq
        elif now - qq.window_since >= self.loss_ns:
            qq.c[K_MISSING] += qq.next_seq - qq.expect_seq
            qq.expect_seq = qq.next_seq
            qq.window_since = 0

    cdef int _rx(self, Queue *qq, int qid) noexcept nogil:
        cdef uint16_t heads[MAX_BURST]
        cdef uint32_t lens[MAX_BURST]
        cdef DrvRing *r = qq.rx
        cdef int got, i, added = 0
        cdef uint32_t slot, nbufs
        cdef uint64_t want
        cdef char *p
        cdef int cap = MAX_BURST
        cdef uint64_t total
        if not drv_mem_ok(r):
            return -1
        if self.mode == M_RX and self.limit:
            # Take no frame past the limit: at most the continuation buffers of
            # a merged frame in progress, then one buffer per frame still wanted.
            total = self._rx_total()
            want = self.limit - total if total < self.limit else 0
            if want + qq.rx_rest < <uint64_t>cap:
                cap = <int>(want + qq.rx_rest)
        got = drv_reclaim(r, heads, lens, cap) if cap > 0 else 0
        if got < 0:
            return -1
        for i in range(got):
            p = qq.rx_buf + <size_t>heads[i] * self.rx_slot
            if lens[i] > self.rx_slot:
                qq.c[K_CORRUPT] += 1       # the device claims more than the buffer holds
                continue
            if qq.rx_rest:
                # The tail of a frame merged over several buffers (MRG_RXBUF).
                qq.rx_rest -= 1
                qq.c[K_RX_BYTES] += lens[i]
                continue
            if lens[i] < self.hdr_len:
                qq.c[K_CORRUPT] += 1
                continue
            nbufs = 1
            if self.mergeable:
                nbufs = <uint8_t>p[10] | (<uint32_t>(<uint8_t>p[11]) << 8)
                if nbufs == 0:
                    nbufs = 1
                if nbufs > self.max_nbufs:
                    self.max_nbufs = nbufs
            qq.rx_rest = nbufs - 1
            qq.c[K_RX_PACKETS] += 1
            qq.c[K_RX_BYTES] += lens[i] - self.hdr_len
            if self.mode == M_LOOP:
                self._check(qq, qid, p + self.hdr_len, lens[i] - self.hdr_len, nbufs)
        # Refill every free slot; publish once; kick only if the device asks.
        # rx with a limit: no more buffers out than the frames still wanted
        # take (frames merged over several buffers: the most seen so far).
        want = r.size
        if self.mode == M_RX and self.limit:
            total = self._rx_total()
            want = (self.limit - total) * self.max_nbufs if total < self.limit else 0
            want = want - self._rx_posted() if want > self._rx_posted() else 0
        if want > r.num_free:
            want = r.num_free
        added = <int>drv_add_slots(r, qq.rx_gpa, self.rx_slot, self.rx_slot, DESC_F_WRITE,
                                   <uint32_t>want)
        if added and drv_publish_avail(r):
            kick(qq.rx_kick, &qq.c[K_KICKS])
        return got

    cdef void _check(self, Queue *qq, int qid, char *f, uint32_t length, uint32_t nbufs) noexcept nogil:
        """Loop mode: one returned frame against what was sent."""
        cdef uint64_t seq = get_u64(f + SEQ_OFFSET) if length >= PATTERN_OFFSET else 0
        cdef const char *t
        if (nbufs != 1 or length != self.pkt_size
                or <uint8_t>f[QID_OFFSET] != (qid & 0xFF) or <uint8_t>f[QID_OFFSET + 1] != (qid >> 8)
                or seq >= qq.next_seq):
            qq.c[K_CORRUPT] += 1
            return
        t = self.templates + (seq & 0xFF) * <size_t>self.pkt_size
        if memcmp(f, t, SEQ_OFFSET) != 0 or memcmp(f + PATTERN_OFFSET, t + PATTERN_OFFSET,
                                                   self.pkt_size - PATTERN_OFFSET) != 0:
            qq.c[K_CORRUPT] += 1
            return
        if seq < qq.expect_seq:
            qq.c[K_OUT_OF_ORDER] += 1     # late, or a duplicate
            return
        qq.c[K_MISSING] += seq - qq.expect_seq
        qq.expect_seq = seq + 1

    cdef void _sleep(self, uint64_t deadline) noexcept nogil:
        """Adaptive poll: ask for interrupts on the rings we wait on, re-check
        (a used buffer may have arrived before the request was visible), then
        sleep on the call eventfds until one fires or the slice ends."""
        cdef pollfd fds[2 * 64]
        cdef int i, nfds = 0, ms
        cdef bint ready = False
        cdef uint64_t now
        for i in range(self.nq):
            if i >= 64:
                break
            if self.mode != M_RX:
                ready |= drv_interrupts_on(self.q[i].tx)
                if self.q[i].tx_call >= 0:
                    fds[nfds].fd = self.q[i].tx_call
                    fds[nfds].events = POLLIN
                    nfds += 1
            if self.mode != M_TX:
                ready |= drv_interrupts_on(self.q[i].rx)
                if self.q[i].rx_call >= 0:
                    fds[nfds].fd = self.q[i].rx_call
                    fds[nfds].events = POLLIN
                    nfds += 1
        now = now_ns()
        if not ready and nfds and now < deadline:
            ms = <int>((deadline - now) // 1000000) + 1
            if ms > 100:
                ms = 100
            poll(fds, nfds, ms)
        for i in range(nfds):
            drain_eventfd(fds[i].fd)
        for i in range(self.nq):
            drv_interrupts_off(self.q[i].tx)
            drv_interrupts_off(self.q[i].rx)
