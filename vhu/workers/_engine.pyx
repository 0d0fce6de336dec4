# cython: language_level=3
"""The worker's data path: one compiled loop over the queue pairs a worker owns.

No Python runs per packet or per batch here: Python (vhu.workers.process)
binds rings and fds, then calls Engine.run(), which returns only when the
control socket has something to say (or a time limit passes).

Apps (what happens to a frame the guest sends on its TX ring):
  sink    count and drop
  echo    back into the same queue pair's RX ring
  patch   into the RX ring of the peer port's queue pair with the same index
  source  (no TX use) fill the guest's RX ring with a generated frame

Poll modes:
  busy      spin, never sleep
  epoll     enable notifications, re-check, sleep on the kick eventfds
  adaptive  spin while traffic flows; after `idle_spins` empty rounds, sleep as epoll
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memset, memcpy
from libc.errno cimport errno, EINTR, EAGAIN
from posix.unistd cimport read, write, close
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from vhu._barriers cimport vhu_likely, vhu_unlikely
from vhu._ring cimport (DeviceRing, DevRing, Seg, ChainInfo, dev_pop_batch, dev_push_used,
                        dev_publish_used, dev_notifications_on, dev_notifications_off,
                        dev_rx_enqueue, dev_avail_pending,
                        C_TX_FRAMES, C_TX_BYTES, C_TX_SHORT, C_RX_NO_ROOM)

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum: EPOLLIN, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC

cdef extern from "<poll.h>" nogil:
    cdef struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN

APPS = ("sink", "echo", "patch", "source")
cdef double CTRL_CHECK_SECONDS = 0.001
POLL_MODES = ("busy", "epoll", "adaptive")

cdef enum:
    APP_SINK = 0
    APP_ECHO = 1
    APP_PATCH = 2
    APP_SOURCE = 3
    POLL_BUSY = 0
    POLL_EPOLL = 1
    POLL_ADAPTIVE = 2
    MAX_BINDINGS = 512
    MAX_BATCH = 256
    MAX_FRAME = 65536

cdef struct Binding:
    # One queue pair of one port: the guest's RX ring (we fill) and TX ring
    # (we drain), each NULL unless started. *_live: the ring may be processed
    # (started); rx_enabled: we may supply RX frames (spec "Ring states").
    DevRing *rx
    DevRing *tx
    bint rx_enabled
    bint tx_enabled
    int rx_call
    int tx_call
    int rx_kick
    int tx_kick
    int peer            # binding whose RX gets our TX frames (echo: ourselves), -1: none


cdef inline void signal_eventfd(int fd) noexcept nogil:
    cdef uint64_t one = 1
    if fd >= 0:
        write(fd, &one, 8)


cdef inline void drain_eventfd(int fd) noexcept nogil:
    cdef uint64_t value
    if fd >= 0:
        read(fd, &value, 8)


cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef class Engine:
    """The compiled loop of one worker process."""
    cdef Binding bindings[MAX_BINDINGS]
    cdef int nbind
    cdef list keep            # DeviceRing objects the bindings point into
    cdef int app
    cdef int poll_mode
    cdef uint32_t batch
    cdef uint32_t idle_spins
    cdef int epfd
    cdef int ctrl_fd
    cdef uint8_t *frame       # the source app's frame
    cdef uint32_t frame_len
    cdef readonly uint64_t sleeps
    cdef readonly uint64_t wakeups

    def __cinit__(self):
        self.epfd = -1
        self.frame = <uint8_t *>calloc(MAX_FRAME, 1)
        if self.frame == NULL:
            raise MemoryError()

    def __init__(self, app="sink", poll="adaptive", batch=32, idle_spins=20000,
                 int ctrl_fd=-1, frame=b""):
        if app not in APPS:
            raise ValueError(f"app must be one of {APPS}, not {app!r}")
        if poll not in POLL_MODES:
            raise ValueError(f"poll must be one of {POLL_MODES}, not {poll!r}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}")
        self.app = APPS.index(app)
        self.poll_mode = POLL_MODES.index(poll)
        self.batch = batch
        self.idle_spins = idle_spins
        self.ctrl_fd = ctrl_fd
        self.keep = []
        self.nbind = 0
        self.set_frame(frame)

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        free(self.frame)

    def set_frame(self, const uint8_t[:] frame):
        if frame.shape[0] > MAX_FRAME:
            raise ValueError(f"frame longer than {MAX_FRAME}")
        if frame.shape[0]:
            memcpy(self.frame, &frame[0], frame.shape[0])
        self.frame_len = frame.shape[0]

    def set_bindings(self, list pairs):
        """pairs: dicts with rx, tx (DeviceRing or None), rx_enabled,
        tx_enabled, rx_call, tx_call, rx_kick, tx_kick (fd or -1) and peer
        (index into pairs, or -1). Replaces the whole set; the epoll set is
        rebuilt from the kick fds (and the control fd)."""
        cdef int i
        cdef DeviceRing ring
        cdef Binding *b
        cdef epoll_event ev
        if len(pairs) > MAX_BINDINGS:
            raise ValueError(f"at most {MAX_BINDINGS} queue pairs per worker")
        keep = []
        memset(self.bindings, 0, sizeof(self.bindings))
        for i, p in enumerate(pairs):
            b = &self.bindings[i]
            b.rx = NULL
            b.tx = NULL
            if p.get("rx") is not None:
                ring = p["rx"]
                keep.append(ring)
                b.rx = ring.ring()
            if p.get("tx") is not None:
                ring = p["tx"]
                keep.append(ring)
                b.tx = ring.ring()
            b.rx_enabled = bool(p.get("rx_enabled", True))
            b.tx_enabled = bool(p.get("tx_enabled", True))
            b.rx_call = p.get("rx_call", -1)
            b.tx_call = p.get("tx_call", -1)
            b.rx_kick = p.get("rx_kick", -1)
            b.tx_kick = p.get("tx_kick", -1)
            b.peer = p.get("peer", -1)
            if not -1 <= b.peer < len(pairs):
                raise ValueError(f"peer {b.peer} out of range")
        self.keep = keep
        self.nbind = len(pairs)
        if self.epfd >= 0:
            close(self.epfd)
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        fds = {p.get("rx_kick", -1) for p in pairs} | {p.get("tx_kick", -1) for p in pairs}
        fds.add(self.ctrl_fd)
        for fd in fds:
            if fd >= 0:
                ev.events = EPOLLIN
                ev.data.fd = fd
                if epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev) != 0:
                    raise OSError(errno, f"epoll_ctl ADD {fd}")

    cdef uint32_t forward(self, Binding *b, Binding *dst) noexcept nogil:
        """Drain up to a batch from b's TX ring into dst's RX ring (or drop
        when dst is NULL or its RX is not ready). Returns chains handled."""
        cdef DevRing *tx = b.tx
        cdef DevRing *rx = NULL
        cdef int n = dev_pop_batch(tx, self.batch)
        cdef int i
        cdef ChainInfo *c
        cdef uint64_t frames = 0, nbytes = 0, dropped = 0, flen
        cdef uint32_t hdr = tx.hdr_len
        if n <= 0:
            return 0
        if dst != NULL and dst.rx != NULL and dst.rx_enabled and b.tx_enabled:
            rx = dst.rx
        for i in range(n):
            c = &tx.chains[i]
            if vhu_unlikely(c.read_len < hdr):
                tx.counters[C_TX_SHORT] += 1
            else:
                flen = c.read_len - hdr
                frames += 1
                nbytes += flen
                if rx != NULL:
                    if dev_rx_enqueue(rx, &tx.segs[c.seg_start], c.nread, hdr, flen) <= 0:
                        dropped += 1
                elif dst != NULL:
                    dropped += 1
            dev_push_used(tx, c.head, 0)
        tx.counters[C_TX_FRAMES] += frames
        tx.counters[C_TX_BYTES] += nbytes
        if dropped and rx != NULL:
            pass   # counted by dev_rx_enqueue as rx_no_room / rx_too_big on rx
        elif dropped:
            tx.counters[C_RX_NO_ROOM] += dropped   # no receiving ring at all
        if dev_publish_used(tx):
            signal_eventfd(b.tx_call)
        if rx != NULL and dev_publish_used(rx):
            signal_eventfd(dst.rx_call)
        return <uint32_t>n

    cdef uint32_t generate(self, Binding *b) noexcept nogil:
        """The source app: fill b's RX ring with copies of self.frame."""
        cdef Seg s
        cdef uint32_t i, done = 0
        if b.rx == NULL or not b.rx_enabled or self.frame_len == 0:
            return 0
        s.ptr = <char *>self.frame
        s.len = self.frame_len
        for i in range(self.batch):
            if dev_rx_enqueue(b.rx, &s, 1, 0, self.frame_len) <= 0:
                break
            done += 1
        if done and dev_publish_used(b.rx):
            signal_eventfd(b.rx_call)
        return done

    cdef uint64_t round(self) noexcept nogil:
        cdef int i
        cdef uint64_t work = 0
        cdef Binding *b
        for i in range(self.nbind):
            b = &self.bindings[i]
            if self.app == APP_SOURCE:
                work += self.generate(b)
                if b.tx != NULL:                 # drain (and drop) what the guest sends
                    work += self.forward(b, NULL)
            elif b.tx != NULL:
                if self.app == APP_SINK or b.peer < 0:
                    work += self.forward(b, NULL)
                else:
                    work += self.forward(b, &self.bindings[b.peer])
        return work

    cdef bint sleep(self, int timeout_ms) noexcept nogil:
        """Re-enable notifications, re-check, sleep on the kick fds.
        Returns True if the control socket woke us."""
        cdef int i, n
        cdef bint raced = False, ctrl = False
        cdef Binding *b
        cdef epoll_event events[64]
        for i in range(self.nbind):
            b = &self.bindings[i]
            # After enabling, re-check: a chain made available before the
            # driver saw the flag would otherwise wait for a kick never sent.
            if b.tx != NULL and dev_notifications_on(b.tx):
                raced = True
            if b.rx != NULL and (self.app == APP_SOURCE) and dev_notifications_on(b.rx):
                raced = True
        if not raced:
            self.sleeps += 1
            n = epoll_wait(self.epfd, events, 64, timeout_ms)
            for i in range(n if n > 0 else 0):
                if events[i].data.fd == self.ctrl_fd:
                    ctrl = True
                else:
                    drain_eventfd(events[i].data.fd)
            self.wakeups += 1
        for i in range(self.nbind):
            b = &self.bindings[i]
            if b.tx != NULL:
                dev_notifications_off(b.tx)
            if b.rx != NULL and self.app == APP_SOURCE:
                dev_notifications_off(b.rx)
        return ctrl

    def run(self, double max_seconds=1.0):
        """Process the bound queues until the control fd is readable or
        max_seconds pass. Returns the number of chains handled."""
        cdef uint64_t total = 0, work, rounds = 0, idle = 0
        cdef double deadline = now() + max_seconds
        cdef double t, next_ctrl_check = 0
        cdef pollfd pfd
        cdef int i
        cdef bint stop = False
        cdef bint polled_rings = False
        pfd.fd = self.ctrl_fd
        pfd.events = POLLIN
        for i in range(self.nbind):
            if (self.bindings[i].tx != NULL and self.bindings[i].tx_kick < 0) or \
               (self.bindings[i].rx != NULL and self.bindings[i].rx_kick < 0):
                polled_rings = True      # a ring without kick fd: never sleep long
        with nogil:
            for i in range(self.nbind):
                if self.bindings[i].tx != NULL:
                    dev_notifications_off(self.bindings[i].tx)
            while not stop:
                work = self.round()
                total += work
                rounds += 1
                if work:
                    idle = 0
                else:
                    idle += 1
                if (rounds & 63) == 0:
                    # The control socket is polled (a syscall) at most once a
                    # millisecond; the clock read is a vDSO call.
                    t = now()
                    if t >= next_ctrl_check:
                        next_ctrl_check = t + CTRL_CHECK_SECONDS
                        pfd.revents = 0
                        if self.ctrl_fd >= 0 and poll(&pfd, 1, 0) > 0:
                            break
                    if t >= deadline:
                        break
                if not work and (self.poll_mode == POLL_EPOLL or
                                 (self.poll_mode == POLL_ADAPTIVE and idle >= self.idle_spins)):
                    stop = self.sleep(1 if polled_rings else 100)
                    if now() >= deadline:
                        break
        return total
