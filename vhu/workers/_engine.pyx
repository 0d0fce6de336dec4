# cython: language_level=3
"""The worker's data path: one compiled loop over the queue pairs a worker owns.

No Python runs per packet here: Python (vhu.workers.process) binds rings and
fds, then calls Engine.run(), which returns only when the control socket has
something to say (or a time limit passes). The one exception is a user
pipeline stage (vhu.workers.Forwarder): it is called once per batch, with the
GIL, and sees the batch as numpy views of private copies of its frames.

Apps (what happens to a frame the guest sends on its TX ring):
  sink    count and drop
  echo    back into the same queue pair's RX ring
  patch   into the RX ring of the peer port's queue pair with the same index
  source  (no TX use) fill the guest's RX ring with a generated frame
  switch  L2 learning switch over every port's queue pair with the same index
  pcap    a sink that captures (captures also work beside any other app)

A binding may also be a Linux TAP device instead of rings (tap_fd): frames
read from it go through the same apps and stages as a guest's, frames for
it are written to it. Or a VXLAN port (vxlan, _vxlan.pxi): inner frames of
the datagrams one recvmmsg(2) reads, and frames for it encapsulated and
sent with sendmmsg(2) at the end of the batch.

Each (port, queue pair) is polled by one worker (vhu.placement). The
bindings with the same queue index form a group, and patch, switch and
stage verdicts only ever move frames inside a group. With several workers a
group also holds the RX rings of ports other workers poll (bound rx only,
rx_shared): frames are delivered into them under a lock in shared memory,
once per ring per batch (_shared.pxi); rings bound unshared take no lock.

Decisions are made on private copies (STYLE.md pattern 14): the guest can
rewrite its buffers while we look at them, so the bytes a decision reads are
copied out of guest memory first and the copy is what gets delivered. The
switch copies each frame's first HEAD_COPY bytes (the two addresses it reads) and
delivers that copy followed by the rest of the frame; a Python stage sees,
edits and sends whole copies. echo, patch and sink decide nothing per frame
and copy a frame once, guest buffer to guest buffer (or not at all).

A frame is at most MAX_FRAME_LEN bytes (virtio-net's bound, vhu._ring): a
chain that carries more is dropped and counted (tx_too_big) before any byte
of it is read.

Poll modes:
  busy      spin, never sleep
  epoll     enable notifications, re-check, sleep on the kick eventfds
  adaptive  spin while traffic flows; after `idle_spins` empty rounds, sleep as epoll
"""
import logging
import time as _time
import traceback

import numpy as np

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, free, calloc
from libc.string cimport memset, memcpy
from libc.errno cimport errno, EINTR, EAGAIN
from posix.unistd cimport read, write, close
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC, CLOCK_REALTIME
from vhu._barriers cimport vhu_likely, vhu_unlikely, vhu_prefetch

cdef extern from "poll_ticks.h" nogil:
    uint64_t vhu_poll_ticks()
from vhu._ring cimport (DeviceRing, DevRing, Seg, ChainInfo, dev_pop_batch, dev_push_popped,
                        dev_publish_used, dev_notifications_on, dev_notifications_off,
                        dev_rx_enqueue, dev_avail_pending, dev_mark_broken, copy_segs,
                        C_TX_FRAMES, C_TX_BYTES, C_TX_SHORT, C_TX_TOO_BIG, C_RX_NO_ROOM, C_KICKS,
                        C_DROP_FILTERED, C_DROP_NO_PORT, C_DROP_STAGE, C_DROP_STAGE_ERROR,
                        C_RX_FRAMES, C_RX_BYTES, C_RX_TOO_BIG, C_COUNT, C_BROKEN_FIRST,
                        B_KICK_FD_ERROR, MAX_FRAME_LEN, dev_rx_enqueue_hdr, C_TX_BAD_OFFLOAD,
                        C_TX_GSO, C_TX_CSUM, C_RX_GSO, C_RX_CSUM, C_RX_SEGMENTED, C_RX_CSUM_DONE,
                        C_VXLAN_BAD, C_VXLAN_FOREIGN, C_VXLAN_TOO_BIG, C_LOG_PAGES)
from vhu.workers._offload cimport (Offload, caps_of, read_vnet_hdr, write_vnet_hdr, offload_need,
                                   offload_check, csum_fill, tso_segment, OFF_OK, GSO_NONE,
                                   VNET_F_NEEDS_CSUM, VNET_HDR_FIELDS)
from vhu._sys cimport (epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLLIN, EPOLLERR,
                       EPOLLHUP, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC, pollfd, poll,
                       POLLIN, sched_yield, signal_eventfd, drain_eventfd)

log = logging.getLogger("vhu.workers.engine")

APPS = ("sink", "echo", "patch", "source", "switch", "pcap")
cdef double CTRL_CHECK_SECONDS = 0.001
# Empty rounds (about 30 ns each) before a spinning worker starts yielding
# its CPU: long enough to cover the gap of a ping-pong loop.
cdef uint64_t YIELD_AFTER_IDLE_ROUNDS = 256
cdef uint32_t CTRL_TAG = 0xFFFFFFFFU    # epoll tag of the control socket
POLL_MODES = ("busy", "epoll", "adaptive")

cdef enum:
    APP_SINK = 0
    APP_ECHO = 1
    APP_PATCH = 2
    APP_SOURCE = 3
    APP_SWITCH = 4
    APP_PCAP = 5
    POLL_BUSY = 0
    POLL_EPOLL = 1
    POLL_ADAPTIVE = 2
    MAX_BINDINGS = 512
    MAX_BATCH = 256
    MAX_FRAME = 65536
    MAX_PORTS = 64
    MAX_GROUPS = 64
    MAC_SLOTS = 4096          # power of two; MAC table entries per worker
    MAC_PROBES = 8            # linear-probe window: a full window evicts its oldest
    MAX_CAPTURES = 256
    CAP_BUF = 1 << 18         # bytes of pcap records buffered per file before write(2)
    HEAD_COPY = 12            # switch: bytes of each frame copied out before deciding (both MACs)
    HEAD_SEGS = 8             # ... a frame in more guest segments than this is copied whole
    TAP_SLOT = MAX_FRAME + 64 # a frame read from or written to a TAP, with its virtio-net header
    KIND_RX_KICK = 0          # epoll tags: binding << 2 | kind
    KIND_TX_KICK = 1
    KIND_TAP = 2
    KIND_VXLAN = 3            # a VXLAN port's receive socket

# Verdicts a pipeline stage returns per frame (>= 0: output port index).
cdef enum:
    V_DROP = -1
    V_APP = -2                # let the built-in app (switch, patch, ...) decide
    V_ERROR = -3              # internal: the stage failed on this batch
VERDICT_DROP = V_DROP
VERDICT_APP = V_APP
# The engine's tables: ports it can tell apart, queue pairs per port.
MAX_PORT_INDEX = MAX_PORTS
MAX_QUEUE_INDEX = MAX_GROUPS

# A stage's view of one frame: the numpy dtype META_DTYPE mirrors it.
cdef struct Meta:
    uint16_t port
    uint16_t queue
    uint32_t length
    uint32_t buf              # index into the batch's buffer views
    uint16_t ethertype        # bytes 12-13 (0 for a runt): filled in C, stages need it most
    uint16_t pad
    uint64_t offset           # where the frame (no virtio-net header) starts in that view
    uint64_t dst_mac          # as 48-bit integers (0 for a runt)
    uint64_t src_mac
    uint8_t flags             # the frame's virtio_net_hdr as checked (all 0: no offload)
    uint8_t gso_type
    uint16_t gso_size
    uint16_t csum_start
    uint16_t csum_offset

META_DTYPE = np.dtype({"names": ["port", "queue", "length", "buf", "ethertype", "offset",
                                 "dst_mac", "src_mac", "flags", "gso_type", "gso_size",
                                 "csum_start", "csum_offset"],
                       "formats": [np.uint16, np.uint16, np.uint32, np.uint32, np.uint16,
                                   np.uint64, np.uint64, np.uint64, np.uint8, np.uint8,
                                   np.uint16, np.uint16, np.uint16],
                       "offsets": [0, 2, 4, 8, 12, 16, 24, 32, 40, 41, 42, 44, 46],
                       "itemsize": 48})

include "_vxlan_defs.pxi"

cdef struct Binding:
    # One queue pair of one port: the guest's RX ring (we fill) and TX ring
    # (we drain), each NULL unless started. rx_enabled: we may supply RX
    # frames (spec "Ring states").
    DevRing *rx
    DevRing *tx
    bint rx_enabled
    bint tx_enabled
    int rx_call
    int tx_call
    int rx_kick
    int tx_kick
    int peer            # binding whose RX gets our TX frames (echo: ourselves), -1: none
    int port            # port index (verdicts and the MAC table name ports)
    int group           # queue pair index: frames move only between bindings of a group
    int cap_rx          # capture slot for frames from the guest (vhu's rx), -1: none
    int cap_tx          # capture slot for frames into the guest (vhu's tx), -1: none
    bint rx_dirty       # RX pushes (or a stash) to publish at the end of the batch
    int tap_fd          # a TAP device instead of rings (O_NONBLOCK, IFF_NO_PI), -1: none
    uint64_t *tap_cnt   # its counters: 2 x C_COUNT, as for a ring pair (RX ring first)
    uint32_t caps       # offloads the port negotiated (vhu.workers._offload.caps_of)
    uint32_t tap_hdr    # a TAP with IFF_VNET_HDR: bytes of virtio-net header per frame, else 0
    VxPort *vx          # a VXLAN port instead of rings (counters: tap_cnt), NULL: none
    int log_call        # SET_LOG_FD: signalled after a round that marked log pages, -1: none
    uint64_t log_seen   # the rings' log_pages counters when last signalled

cdef struct MacEntry:
    uint64_t mac        # 48-bit address; 0: empty slot
    int port
    double seen         # CLOCK_MONOTONIC of the last frame from mac

cdef struct Capture:
    int fd
    uint32_t snaplen
    uint32_t used
    char *buf
    uint64_t records
    uint64_t write_errors


cdef inline uint64_t log_marks(Binding *b) noexcept nogil:
    """Log bits the queue pair's rings have set so far (their log_pages counters)."""
    cdef uint64_t n = 0
    if b.rx != NULL:
        n += b.rx.counters[C_LOG_PAGES]
    if b.tx != NULL:
        n += b.tx.counters[C_LOG_PAGES]
    return n


cdef inline double now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint32_t mac_hash(uint64_t mac) noexcept nogil:
    return <uint32_t>((mac * 0x9E3779B97F4A7C15ULL) >> 52) & (MAC_SLOTS - 1)


cdef inline uint64_t mac_of(const uint8_t *p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24) |
            (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | <uint64_t>p[5])


cdef inline void header_fields(Meta *m, const uint8_t *f, int64_t length) noexcept nogil:
    if f == NULL or length < 14:
        m.ethertype = 0
        m.dst_mac = 0
        m.src_mac = 0
        return
    m.dst_mac = mac_of(f)
    m.src_mac = mac_of(f + 6)
    m.ethertype = (<uint16_t>f[12] << 8) | f[13]


include "_vxlan.pxi"
include "_shared.pxi"     # the cross-worker RX-ring lock and the shared MAC table


cdef class Engine:
    """The compiled loop of one worker process."""
    cdef Binding bindings[MAX_BINDINGS]
    cdef int nbind
    cdef int nlog_calls       # bindings with a log_call fd (0: the round never looks)
    cdef int members[MAX_GROUPS][MAX_PORTS]     # binding indices of each group
    cdef int nmembers[MAX_GROUPS]
    cdef int port_bind[MAX_GROUPS][MAX_PORTS]   # (group, port) -> binding, -1
    cdef list keep            # DeviceRing objects the bindings point into
    cdef int app
    cdef int poll_mode
    cdef uint32_t batch
    cdef uint32_t idle_spins
    cdef uint64_t idle_rounds      # empty rounds in a row, kept across run() calls
    cdef int epfd
    cdef int ctrl_fd
    cdef uint8_t *frame       # the source app's frame
    cdef uint32_t frame_len
    cdef readonly uint64_t sleeps
    cdef readonly uint64_t wakeups
    # switch
    cdef MacEntry *macs
    cdef readonly double mac_ageing
    # The last source learned and the last destination looked up in the
    # batch being dispatched (dispatch forgets both at its start): a batch
    # is mostly one flow, so most of its frames skip the table. Learning
    # anything new forgets the lookup.
    cdef uint64_t last_src
    cdef int last_src_port                 # -1: nothing learned yet this batch
    cdef uint64_t last_dst
    cdef int last_dst_out                  # its verdict: a binding, -1 drop, -2 flood
    cdef bint last_dst_known
    # captures
    cdef Capture caps[MAX_CAPTURES]
    cdef int ncap
    cdef uint32_t ts_sec, ts_usec         # CLOCK_REALTIME of the current batch
    # per-batch scratch: where each frame's bytes are, and its verdict
    cdef Seg *fsrc[MAX_BATCH]
    cdef uint32_t fnsrc[MAX_BATCH]
    cdef uint64_t fskip[MAX_BATCH]
    cdef int64_t flen[MAX_BATCH]           # -1: not a frame (short chain)
    cdef int verdict[MAX_BATCH]
    cdef Seg gathered[MAX_BATCH]           # frames copied into `scratch` for a stage
    cdef int stage_index[MAX_BATCH]        # stage row -> frame of the batch
    cdef char *tap_in                      # batch x TAP_SLOT: frames read from a TAP
    cdef char *tap_out                     # one frame gathered for write(2) to a TAP
    cdef char *injected                    # a frame sent on a guest's behalf (inject)
    cdef Seg injected_seg
    cdef Seg tap_segs[MAX_BATCH]
    cdef uint8_t vx_owner[MAX_BATCH]         # VXLAN: the port (of a shared socket) of each frame
    # pipeline stage (Python, once per batch)
    cdef object stage
    cdef object meta_arr
    cdef Meta *meta
    cdef object scratch_arr
    cdef char *scratch
    cdef readonly uint64_t stage_errors
    cdef double last_error_log
    cdef uint64_t errors_unlogged
    # private copies a decision reads (see the module docstring)
    cdef char *heads                       # MAX_BATCH x HEAD_COPY
    cdef Seg psegs[MAX_BATCH * (HEAD_SEGS + 1)]
    cdef char *whole                       # MAX_BATCH x MAX_FRAME, for many-segment frames
    cdef Seg whole_segs[MAX_BATCH]
    # liveness: bumped about every millisecond while the loop runs (the
    # master's supervisor presumes a worker whose beat stops hung)
    cdef volatile uint64_t *beat
    cdef object beat_owner
    cdef uint64_t own_beat
    # load: [polling ticks, busy ticks] (vhu.stats.WorkerSlot.LOAD): time in
    # run()'s loop, and the part of it spent in rounds that moved something
    cdef volatile uint64_t *load
    cdef object load_owner
    cdef uint64_t own_load[2]
    # offloads (take_offload, deliver_offload): frames whose header asks for one
    cdef uint8_t foff[MAX_BATCH]           # 1: finfo holds its checked header
    cdef Offload finfo[MAX_BATCH]
    cdef char *ocopy                       # batch x MAX_FRAME: their private copies (lazily)
    cdef Seg oseg[MAX_BATCH]
    cdef char *obuf                        # one segment or finished frame being delivered
    # cross-worker delivery (_shared.pxi)
    cdef RxShare share[MAX_BINDINGS]
    cdef uint64_t holder                   # this worker's lock word (set_worker)
    cdef int backlogged                    # bindings with frames in their backlog
    cdef SharedMac *smacs                  # the shared MAC table, NULL: self.macs
    cdef object smacs_owner

    def __cinit__(self):
        self.epfd = -1
        self.frame = <uint8_t *>calloc(MAX_FRAME, 1)
        self.macs = <MacEntry *>calloc(MAC_SLOTS, sizeof(MacEntry))
        self.tap_out = <char *>malloc(TAP_SLOT)
        self.injected = <char *>malloc(MAX_FRAME)
        self.heads = <char *>malloc(MAX_BATCH * HEAD_COPY)
        self.obuf = <char *>malloc(MAX_FRAME)
        self.beat = &self.own_beat
        self.load = &self.own_load[0]
        self.holder = 1
        if (self.frame == NULL or self.macs == NULL or self.tap_out == NULL
                or self.injected == NULL or self.heads == NULL or self.obuf == NULL):
            raise MemoryError()

    def __init__(self, app="sink", poll="adaptive", batch=32, idle_spins=20000,
                 int ctrl_fd=-1, frame=b"", stage=None, double mac_ageing=300.0):
        if app not in APPS:
            raise ValueError(f"app must be one of {APPS}, not {app!r}")
        if poll not in POLL_MODES:
            raise ValueError(f"poll must be one of {POLL_MODES}, not {poll!r}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1..{MAX_BATCH}")
        if not mac_ageing > 0:
            raise ValueError("mac_ageing must be positive")
        if stage is not None and not callable(stage):
            raise TypeError("stage must be callable")
        self.app = APPS.index(app)
        self.poll_mode = POLL_MODES.index(poll)
        self.batch = batch
        self.idle_spins = idle_spins
        self.ctrl_fd = ctrl_fd
        self.keep = []
        self.nbind = 0
        self.mac_ageing = mac_ageing
        self.set_frame(frame)
        self.stage = stage
        if stage is not None:
            # Every frame is copied here for the stage (and forwarded from
            # here, so its edits count and the guest's later ones do not).
            self.meta_arr = np.zeros(MAX_BATCH, dtype=META_DTYPE)
            self.meta = <Meta *><size_t>self.meta_arr.ctypes.data
            self.scratch_arr = np.zeros(batch * MAX_FRAME, dtype=np.uint8)
            self.scratch = <char *><size_t>self.scratch_arr.ctypes.data
        elif self.app == APP_SWITCH:
            # Address space only: touched by frames in many segments.
            self.whole = <char *>malloc(<size_t>batch * MAX_FRAME)
            if self.whole == NULL:
                raise MemoryError()

    def set_heartbeat(self, buffer, Py_ssize_t offset):
        """Bump the u64 at buffer[offset] about every millisecond while running."""
        cdef unsigned char[::1] mv = buffer
        if offset < 0 or offset % 8 or offset + 8 > mv.shape[0]:
            raise ValueError("the heartbeat must be an aligned u64 inside the buffer")
        self.beat_owner = buffer
        self.beat = <volatile uint64_t *>&mv[offset]

    def set_load(self, buffer, Py_ssize_t offset):
        """Keep the loop's [polling ticks, busy ticks] in the two u64 at
        buffer[offset] (written about every millisecond while running)."""
        cdef unsigned char[::1] mv = buffer
        if offset < 0 or offset % 8 or offset + 16 > mv.shape[0]:
            raise ValueError("the load counters must be two aligned u64 inside the buffer")
        self.load_owner = buffer
        self.load = <volatile uint64_t *>&mv[offset]

    def load_ticks(self):
        """(polling ticks, busy ticks) so far: their ratio is the share of
        the loop's time spent in rounds that moved frames."""
        return self.load[0], self.load[1]

    def heartbeat(self):
        """One beat from Python (the worker's command loop)."""
        self.beat[0] += 1

    def __dealloc__(self):
        cdef int i
        if self.epfd >= 0:
            close(self.epfd)
        for i in range(self.ncap):
            free(self.caps[i].buf)         # NULL for a closed slot: free() accepts it
        free(self.frame)
        free(self.macs)
        free(self.tap_in)
        free(self.tap_out)
        free(self.injected)
        free(self.heads)
        free(self.whole)
        free(self.ocopy)
        free(self.obuf)
        for i in range(MAX_BINDINGS):
            free(self.share[i].buf)

    def inject(self, int port, const uint8_t[:] frame):
        """Send `frame` (no virtio-net header) as if the guest on `port` had
        sent it on queue pair 0: the stage and the app decide where it goes,
        as for any frame of that guest (the back-end's SEND_RARP). Counted
        with that queue pair's frames from the guest. False when the port has
        no queue pair 0 here."""
        cdef int bi = self.port_bind[0][port] if 0 <= port < MAX_PORTS else -1
        cdef Binding *b
        cdef uint64_t *cnt
        cdef uint64_t unused[C_COUNT]
        cdef timespec ts
        cdef double t = 0
        cdef uint32_t n = <uint32_t>frame.shape[0]
        memset(unused, 0, sizeof(unused))
        if bi < 0 or n == 0 or n > MAX_FRAME:
            return False
        b = &self.bindings[bi]
        cnt = (b.tx.counters if b.tx != NULL else
               b.tap_cnt + C_COUNT if b.tap_cnt != NULL else unused)
        memcpy(self.injected, &frame[0], n)
        self.injected_seg.ptr = self.injected
        self.injected_seg.len = n
        self.fsrc[0] = &self.injected_seg
        self.fnsrc[0] = 1
        self.fskip[0] = 0
        self.flen[0] = n
        self.verdict[0] = V_APP
        self.foff[0] = 0
        if self.ncap:
            clock_gettime(CLOCK_REALTIME, &ts)
            self.ts_sec = <uint32_t>ts.tv_sec
            self.ts_usec = <uint32_t>(ts.tv_nsec // 1000)
            if b.cap_rx >= 0:
                self.capture(b.cap_rx, &self.injected_seg, 1, 0, n)
        if self.app == APP_SWITCH:
            t = now()
        cnt[C_TX_FRAMES] += 1
        cnt[C_TX_BYTES] += n
        self.dispatch(bi, 1, 1, cnt, t)
        self.flush_captures()
        return True

    def set_frame(self, const uint8_t[:] frame):
        if frame.shape[0] > MAX_FRAME:
            raise ValueError(f"frame longer than {MAX_FRAME}")
        if frame.shape[0]:
            memcpy(self.frame, &frame[0], frame.shape[0])
        self.frame_len = frame.shape[0]

    def add_capture(self, int fd, uint32_t snaplen=65535):
        """Append classic pcap records to fd (the caller wrote the file
        header and keeps the fd). Returns the capture slot for bindings'
        cap_rx / cap_tx."""
        cdef int slot = 0
        if snaplen < 14:
            raise ValueError("snaplen must be at least 14")
        while slot < self.ncap and self.caps[slot].buf != NULL:
            slot += 1                       # a slot close_capture freed is taken again
        if slot >= MAX_CAPTURES:
            raise ValueError(f"at most {MAX_CAPTURES} captures per worker")
        cdef Capture *c = &self.caps[slot]
        c.buf = <char *>malloc(CAP_BUF)
        if c.buf == NULL:
            raise MemoryError()
        c.fd = fd
        c.snaplen = snaplen if snaplen < MAX_FRAME else MAX_FRAME
        c.used = 0
        c.records = 0
        c.write_errors = 0
        if slot == self.ncap:
            self.ncap += 1
        return slot

    def close_capture(self, int slot):
        """Write out and drop a capture (its port went); the caller closes the
        fd and must have rebound without it."""
        if not 0 <= slot < self.ncap or self.caps[slot].buf == NULL:
            raise ValueError(f"{slot} is not a capture slot")
        self.flush_capture(&self.caps[slot])
        free(self.caps[slot].buf)
        self.caps[slot].buf = NULL
        self.caps[slot].fd = -1

    def flush(self):
        """Write out buffered capture records (before the owner closes the files)."""
        self.flush_captures()

    def capture_stats(self):
        self.flush_captures()
        return [dict(records=self.caps[i].records, write_errors=self.caps[i].write_errors)
                for i in range(self.ncap)]

    def mac_table(self):
        """Live entries as {mac (int): port}, for tests and debugging."""
        return {mac: port for mac, port, _ in self.mac_entries()}

    def mac_entries(self):
        """Live entries as (mac (int), port, seconds since last seen)."""
        cdef double t = now()
        if self.smacs != NULL:
            return [(self.smacs[i].word >> 16, <int>(self.smacs[i].word & 0xFFFF) - 1,
                     t - self.smacs[i].seen)
                    for i in range(MAC_SLOTS)
                    if self.smacs[i].word and t - self.smacs[i].seen < self.mac_ageing]
        return [(self.macs[i].mac, self.macs[i].port, t - self.macs[i].seen)
                for i in range(MAC_SLOTS)
                if self.macs[i].mac and t - self.macs[i].seen < self.mac_ageing]

    def forget_port(self, int port):
        """Drop every station learned on `port` (it was removed: its index may
        be given to another port)."""
        cdef int i
        if self.smacs != NULL:
            smac_forget_port(self.smacs, port)
            return
        for i in range(MAC_SLOTS):
            if self.macs[i].mac and self.macs[i].port == port:
                self.macs[i].mac = 0

    def set_bindings(self, list pairs):
        """pairs: dicts with rx, tx (DeviceRing or None), rx_enabled,
        tx_enabled, rx_call, tx_call, rx_kick, tx_kick (fd or -1), peer
        (index into pairs, or -1), port and queue (default: the pair's index
        and 0), cap_rx / cap_tx (capture slots or -1). Replaces the whole
        set; the epoll set is rebuilt from the kick fds (and the control fd)."""
        cdef int i, g, port, nlog = 0
        cdef DeviceRing ring
        cdef Binding *b
        cdef epoll_event ev
        cdef uint64_t[::1] cnt
        cdef VxlanSocket vs
        if len(pairs) > MAX_BINDINGS:
            raise ValueError(f"at most {MAX_BINDINGS} queue pairs per worker")
        # Everything is checked before anything changes: a bad set leaves the
        # engine running the old one.
        seen = set()
        for i, p in enumerate(pairs):
            key = (p.get("queue", 0), p.get("port", i))
            if key in seen:
                raise ValueError(f"port {key[1]} queue {key[0]} bound twice")
            seen.add(key)
            if not -1 <= p.get("peer", -1) < len(pairs):
                raise ValueError(f"peer {p.get('peer')} out of range")
            if not 0 <= p.get("port", i) < MAX_PORTS:
                raise ValueError(f"port must be 0..{MAX_PORTS - 1}")
            if not 0 <= p.get("queue", 0) < MAX_GROUPS:
                raise ValueError(f"queue must be 0..{MAX_GROUPS - 1}")
            for k in ("cap_rx", "cap_tx"):
                slot = p.get(k, -1)
                if not -1 <= slot < self.ncap or (slot >= 0 and self.caps[slot].buf == NULL):
                    raise ValueError(f"{k} {slot} is not a capture slot")
            if p.get("vxlan") is not None:
                if (p.get("rx") is not None or p.get("tx") is not None
                        or p.get("tap_fd", -1) >= 0):
                    raise ValueError("a binding is rings, a TAP or a VXLAN port")
                if not isinstance(p["vxlan"], VxlanSocket):
                    raise TypeError("vxlan: a VxlanSocket")
                cnt = p.get("tap_counters")
                if cnt is None or len(cnt) < 2 * C_COUNT:
                    raise ValueError(f"tap_counters: need {2 * C_COUNT} u64s")
            if p.get("tap_fd", -1) >= 0:
                if p.get("rx") is not None or p.get("tx") is not None:
                    raise ValueError("a binding is rings or a TAP, not both")
                cnt = p.get("tap_counters")
                if cnt is None or len(cnt) < 2 * C_COUNT:
                    raise ValueError(f"tap_counters: need {2 * C_COUNT} u64s")
                if p.get("tap_vnet_hdr", 0) not in (0, 10, 12):
                    raise ValueError("tap_vnet_hdr: 0, 10 or 12")
                if self.tap_in == NULL:
                    self.tap_in = <char *>malloc(self.batch * TAP_SLOT)
                    if self.tap_in == NULL:
                        raise MemoryError()
        keep = []
        with nogil:
            self.drain_backlogs(0.05)    # frames held back go out before the rings change
        memset(self.bindings, 0, sizeof(self.bindings))
        memset(self.nmembers, 0, sizeof(self.nmembers))
        memset(self.port_bind, 0xFF, sizeof(self.port_bind))     # all -1
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
            b.port = p.get("port", i)
            b.group = p.get("queue", 0)
            b.cap_rx = p.get("cap_rx", -1)
            b.cap_tx = p.get("cap_tx", -1)
            b.tap_fd = p.get("tap_fd", -1)
            b.tap_cnt = NULL
            b.caps = caps_of(<uint64_t>p.get("features", 0))
            b.tap_hdr = p.get("tap_vnet_hdr", 0) if b.tap_fd >= 0 else 0
            b.vx = NULL
            b.log_call = p.get("log_call", -1) if (b.rx != NULL or b.tx != NULL) else -1
            b.log_seen = log_marks(b)
            if b.log_call >= 0:
                nlog += 1
            if b.tap_fd >= 0 or p.get("vxlan") is not None:
                cnt = p["tap_counters"]
                keep.append(cnt)
                b.tap_cnt = <uint64_t *>&cnt[0]
            if p.get("vxlan") is not None:
                vs = p["vxlan"]
                keep.append(vs)
                b.vx = &vs.p
                b.vx.ageing = self.mac_ageing
                b.vx.write_only = bool(p.get("vxlan_write_only", False))
            self.share[i].shared = b.rx != NULL and bool(p.get("rx_shared", False))
            self.share[i].epoch = p.get("rx_epoch", 0) if self.share[i].shared else 0
            self.share[i].tap_write_only = b.tap_fd >= 0 and bool(p.get("tap_write_only", False))
            self.share[i].held = self.share[i].busy = False
            g, port = b.group, b.port
            self.port_bind[g][port] = i
            self.members[g][self.nmembers[g]] = i
            self.nmembers[g] += 1
        self.keep = keep
        self.nbind = len(pairs)
        self.nlog_calls = nlog
        self.group_vxlan()
        if self.epfd >= 0:
            close(self.epfd)
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1")
        # epoll data: fd in the low half, binding << 2 | kind in the high half
        # (KIND_RX_KICK, KIND_TX_KICK, KIND_TAP), so a wake-up is charged as a
        # kick to the right ring, and a TAP is left for forward_tap to read.
        tags = {}
        for i, p in enumerate(pairs):
            for kind, key in ((KIND_RX_KICK, "rx_kick"), (KIND_TX_KICK, "tx_kick"),
                              (KIND_TAP, "tap_fd")):
                if p.get(key, -1) >= 0 and not (kind == KIND_TAP and p.get("tap_write_only")):
                    tags[p[key]] = (i << 2) | kind
            if p.get("vxlan") is not None and p["vxlan"].fd >= 0 and self.bindings[i].vx.reader:
                tags[p["vxlan"].fd] = (i << 2) | KIND_VXLAN
        if self.ctrl_fd >= 0:
            tags[self.ctrl_fd] = CTRL_TAG
        for fd, tag in tags.items():
            if self.watch(fd, tag) != 0:
                raise OSError(errno, f"epoll_ctl ADD {fd}")

    cdef void group_vxlan(self) noexcept:
        """VXLAN ports whose sockets are one (the same inode: the master
        gave each a duplicate) form a group: the first bound reads for all."""
        cdef int i, j
        cdef VxPort *p
        cdef VxPort *q
        for i in range(self.nbind):
            p = self.bindings[i].vx
            if p == NULL:
                continue
            p.reader = False   # write-only (another worker reads): never reads
            p.nshared = 0
            p.rxcnt = self.bindings[i].tap_cnt + C_COUNT
        for i in range(self.nbind):
            p = self.bindings[i].vx
            if p == NULL or p.nshared or p.reader or p.write_only:
                continue
            p.reader = True
            p.shared[0] = p
            p.shared_bind[0] = i
            p.nshared = 1
            for j in range(i + 1, self.nbind):
                q = self.bindings[j].vx
                if (q != NULL and not q.reader and not q.write_only and q.nshared == 0 and q.ino == p.ino
                        and p.nshared < VX_MAX_SHARED):
                    p.shared[p.nshared] = q
                    p.shared_bind[p.nshared] = j
                    p.nshared += 1
                    q.nshared = -1           # read by p

    cdef int watch(self, int fd, uint32_t tag) noexcept:
        cdef epoll_event ev
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t>tag << 32) | <uint32_t>fd
        return epoll_ctl(self.epfd, EPOLL_CTL_ADD, fd, &ev)

    def update_ring(self, int port, int queue, int kind, bint enabled, int kick, int call):
        """One ring's enable flag, kick fd (-1: polled) and call fd (-1: none),
        changed in place: no other binding is touched. kind 0 is the queue
        pair's RX ring (the guest's receive queue), 1 its TX ring. Raises
        (and changes nothing) if the ring is not bound here or the new kick
        fd cannot be watched; the caller keeps fd ownership either way."""
        cdef int bi = (self.port_bind[queue][port]
                       if 0 <= port < MAX_PORTS and 0 <= queue < MAX_GROUPS else -1)
        cdef Binding *b
        cdef int old_kick
        cdef epoll_event ev
        if bi < 0 or kind not in (KIND_RX_KICK, KIND_TX_KICK):
            raise KeyError(f"port {port} queue {queue} is not bound here")
        b = &self.bindings[bi]
        if (b.rx if kind == KIND_RX_KICK else b.tx) == NULL:
            raise KeyError(f"port {port} queue {queue}: ring {kind} not started")
        old_kick = b.rx_kick if kind == KIND_RX_KICK else b.tx_kick
        if kick != old_kick:
            if kick >= 0 and self.watch(kick, <uint32_t>((bi << 2) | kind)) != 0:
                raise OSError(errno, f"epoll_ctl ADD {kick}")
            if old_kick >= 0:
                epoll_ctl(self.epfd, EPOLL_CTL_DEL, old_kick, &ev)
        if kind == KIND_RX_KICK:
            b.rx_enabled, b.rx_kick, b.rx_call = enabled, kick, call
        else:
            b.tx_enabled, b.tx_kick, b.tx_call = enabled, kick, call

    # -- captures -----------------------------------------------------------

    cdef void flush_captures(self) noexcept nogil:
        cdef int i
        for i in range(self.ncap):
            if self.caps[i].buf != NULL:
                self.flush_capture(&self.caps[i])

    cdef void flush_capture(self, Capture *c) noexcept nogil:
        cdef uint32_t off = 0
        cdef long n
        while off < c.used:
            n = write(c.fd, c.buf + off, c.used - off)
            if n < 0 and errno == EINTR:
                continue
            if n <= 0:
                c.write_errors += 1       # the rest of the buffer is lost, not retried forever
                break
            off += n
        c.used = 0

    cdef void capture(self, int slot, const Seg *src, uint32_t nsrc, uint64_t skip,
                      uint64_t length) noexcept nogil:
        """One pcap record: header (ts, incl_len, orig_len) then the frame."""
        cdef Capture *c = &self.caps[slot]
        cdef uint32_t incl = length if length < c.snaplen else c.snaplen
        cdef uint32_t hdr[4]
        cdef Seg dst
        if c.used + 16 + incl > CAP_BUF:
            self.flush_capture(c)
        hdr[0] = self.ts_sec
        hdr[1] = self.ts_usec
        hdr[2] = incl
        hdr[3] = <uint32_t>length
        memcpy(c.buf + c.used, hdr, 16)
        dst.ptr = c.buf + c.used + 16
        dst.len = incl
        copy_segs(&dst, 1, 0, src, nsrc, skip, incl)
        c.used += 16 + incl
        c.records += 1

    # -- switch -------------------------------------------------------------

    cdef int mac_lookup(self, uint64_t mac, double t) noexcept nogil:
        cdef uint32_t h = mac_hash(mac), k
        cdef MacEntry *e
        if self.smacs != NULL:
            return smac_lookup(self.smacs, mac, t, self.mac_ageing)
        for k in range(MAC_PROBES):
            e = &self.macs[(h + k) & (MAC_SLOTS - 1)]
            if e.mac == mac:
                return e.port if t - e.seen < self.mac_ageing else -1
        return -1

    cdef void mac_learn(self, uint64_t mac, int port, double t) noexcept nogil:
        cdef uint32_t h = mac_hash(mac), k
        cdef MacEntry *e
        cdef MacEntry *victim = NULL
        if self.smacs != NULL:
            smac_learn(self.smacs, mac, port, t)
            return
        for k in range(MAC_PROBES):
            e = &self.macs[(h + k) & (MAC_SLOTS - 1)]
            if e.mac == mac:
                e.port = port                 # a station that moved is followed at once
                e.seen = t
                return
            if e.mac == 0:
                if victim == NULL or victim.mac != 0:
                    victim = e                # the first empty slot
            elif victim == NULL or (victim.mac != 0 and e.seen < victim.seen):
                victim = e                    # else the least recently seen
        # New station: an empty slot, else the least recently seen (aged
        # entries are the oldest) of the probe window.
        victim.mac = mac
        victim.port = port
        victim.seen = t

    cdef int switch_out(self, Binding *b, int i, double t, uint64_t *cnt) noexcept nogil:
        """Learn the source; the destination's binding, -1 to drop, -2 to flood."""
        cdef uint8_t snap[12]
        cdef const uint8_t *eth
        cdef Seg d
        cdef uint64_t dst, src
        if self.flen[i] < 14:
            cnt[C_DROP_FILTERED] += 1   # not an Ethernet frame
            return -1
        if self.fsrc[i][0].len >= self.fskip[i] + 12:
            # Both addresses in the first segment (the common frame: the
            # head copy or a private buffer): read where they are.
            eth = <const uint8_t *>self.fsrc[i][0].ptr + self.fskip[i]
        else:
            d.ptr = <char *>snap
            d.len = 12
            copy_segs(&d, 1, 0, self.fsrc[i], self.fnsrc[i], self.fskip[i], 12)
            eth = snap
        src = mac_of(eth + 6)
        if not (eth[6] & 1) and src != 0 and (
                src != self.last_src or b.port != self.last_src_port):
            # never learn group addresses; the same station from the same
            # port in the same batch would write the same entry again
            self.mac_learn(src, b.port, t)
            self.last_src = src
            self.last_src_port = b.port
            self.last_dst_known = False
        if eth[0] & 1:
            return -2                               # broadcast / multicast
        dst = mac_of(eth)
        if not (self.last_dst_known and dst == self.last_dst):
            self.last_dst = dst
            self.last_dst_out = self.unicast_out(b, self.mac_lookup(dst, t))
            self.last_dst_known = True
        if self.last_dst_out == -1:
            cnt[C_DROP_FILTERED] += 1     # never back to the in-port
        return self.last_dst_out

    cdef inline int unicast_out(self, Binding *b, int port) noexcept nogil:
        """Where a unicast frame from b goes whose destination was learned
        on `port` (-1: not learned): a binding, -1 to drop, -2 to flood."""
        if port < 0:
            return -2                               # unknown unicast
        if port == b.port:
            return -1                               # never back to the in-port
        if self.port_bind[b.group][port] < 0:
            return -2                               # that port's queue is not bound here
        return self.port_bind[b.group][port]

    # -- moving frames ------------------------------------------------------

    cdef bint deliver(self, int i, int to) noexcept nogil:
        """Frame i of the current batch into binding `to`'s RX ring."""
        if vhu_unlikely(self.foff[i] != 0):
            return self.deliver_offload(i, to)
        return self.put(to, self.fsrc[i], self.fnsrc[i], self.fskip[i], self.flen[i], NULL)

    # -- offloads: frames whose virtio_net_hdr asks
    # for an offload (NEEDS_CSUM, a gso_type). Only such frames come here (the
    # plain path reads two header bytes and goes on); see vhu.workers._offload
    # for the checks and the software fallback.
    #
    # From a guest: the header and the whole frame are copied out of guest
    # memory (the frame is what the checks read, so it is what is delivered),
    # then checked against what that port negotiated; a header that is not
    # honoured drops the frame (tx_bad_offload). To each receiver: as it is,
    # header passed on, where the receiver negotiated what the frame needs
    # (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN); else vhu finishes the checksum or
    # segments the frame itself, into obuf, one frame at a time, and each
    # result goes into the receiver like any frame. A TAP opened with
    # IFF_VNET_HDR takes (and sends) them all (vhu.tap); one without gets
    # finished frames.

    cdef bint take_offload(self, Binding *b, int i, uint64_t *cnt) noexcept nogil:
        """Frame i of the batch (from b's TX ring) asks for an offload: copy
        it out, check it. False: dropped (counted as tx_bad_offload)."""
        cdef uint8_t h[VNET_HDR_FIELDS]
        cdef Seg d
        cdef Offload *o = &self.finfo[i]
        cdef int64_t flen = self.flen[i]
        d.ptr = <char *>h
        d.len = VNET_HDR_FIELDS
        if copy_segs(&d, 1, 0, self.fsrc[i], self.fnsrc[i], 0, VNET_HDR_FIELDS) != 0:
            memset(h, 0, VNET_HDR_FIELDS)      # a 10-byte header always fits: not reached
        read_vnet_hdr(o, h)
        if not (o.flags & VNET_F_NEEDS_CSUM) and o.gso_type == GSO_NONE:
            return True                        # the guest took it back: a plain frame
        if self.ocopy == NULL:
            # Address space for a batch of 64 KiB frames; pages are touched
            # only by the frames that come this way.
            self.ocopy = <char *>malloc(<size_t>self.batch * MAX_FRAME)
            if self.ocopy == NULL:
                cnt[C_TX_BAD_OFFLOAD] += 1     # cannot check it: not trusted either
                self.flen[i] = -1
                return False
        self.oseg[i].ptr = self.ocopy + <size_t>i * MAX_FRAME
        self.oseg[i].len = <uint32_t>flen
        copy_segs(&self.oseg[i], 1, 0, self.fsrc[i], self.fnsrc[i], self.fskip[i], flen)
        self.fsrc[i] = &self.oseg[i]
        self.fnsrc[i] = 1
        self.fskip[i] = 0
        if offload_check(o, <uint8_t *>self.oseg[i].ptr, <uint32_t>flen, b.caps) != OFF_OK:
            cnt[C_TX_BAD_OFFLOAD] += 1
            self.flen[i] = -1
            return False
        self.foff[i] = 1
        cnt[C_TX_GSO if o.gso_type != GSO_NONE else C_TX_CSUM] += 1
        return True

    cdef uint64_t *rx_counters(self, Binding *dst) noexcept nogil:
        """The receiving half's counters of a binding (RX ring, TAP or VXLAN port)."""
        if dst.tap_fd >= 0 or dst.vx != NULL:
            return dst.tap_cnt
        return dst.rx.counters if dst.rx != NULL else NULL

    cdef bint deliver_offload(self, int i, int to) noexcept nogil:
        """Frame i (checked by take_offload) into binding `to`: as it is if
        the receiver can take it, else finished or segmented by vhu."""
        cdef Binding *dst = &self.bindings[to]
        cdef Offload *o = &self.finfo[i]
        cdef uint32_t need = offload_need(o)
        cdef uint32_t k, n, length = <uint32_t>self.flen[i]
        cdef uint64_t *cnt = self.rx_counters(dst)
        cdef uint8_t h[VNET_HDR_FIELDS]
        cdef const uint8_t *f
        cdef Seg seg
        cdef bint ok = False
        if cnt == NULL or (dst.tap_fd < 0 and dst.vx == NULL and not dst.rx_enabled):
            return False                      # no receiving ring: dispatch counts it
        if (dst.caps & need) == need:          # a TAP without IFF_VNET_HDR has no caps
            write_vnet_hdr(o, h)
            if self.put(to, self.fsrc[i], self.fnsrc[i], self.fskip[i], length, h):
                cnt[C_RX_GSO if o.gso_type != GSO_NONE else C_RX_CSUM] += 1
                return True
            return False
        # The frame is one private copy (take_offload; a stage's scratch is
        # one segment too); a stage may have edited it, never resized it.
        if self.fnsrc[i] == 1:
            f = <const uint8_t *>self.fsrc[i].ptr + self.fskip[i]
        else:
            seg.ptr = self.obuf
            seg.len = length
            copy_segs(&seg, 1, 0, self.fsrc[i], self.fnsrc[i], self.fskip[i], length)
            f = <const uint8_t *>self.obuf
        seg.ptr = self.obuf
        if o.gso_type == GSO_NONE:
            if f != <const uint8_t *>self.obuf:
                memcpy(self.obuf, f, length)
            csum_fill(<uint8_t *>self.obuf, length, o.csum_start, o.csum_offset)
            seg.len = length
            ok = self.put(to, &seg, 1, 0, length, NULL)
            if ok:
                cnt[C_RX_CSUM_DONE] += 1
            return ok
        if f == <const uint8_t *>self.obuf:
            # Segments are built into obuf: the source must be elsewhere.
            seg.ptr = self.ocopy + <size_t>i * MAX_FRAME if self.ocopy != NULL else NULL
            if seg.ptr == NULL:
                return False
            memcpy(seg.ptr, self.obuf, length)
            f = <const uint8_t *>seg.ptr
            seg.ptr = self.obuf
        for k in range(o.nseg):
            n = tso_segment(f, length, o, k, <uint8_t *>self.obuf)
            seg.len = n
            if self.put(to, &seg, 1, 0, n, NULL):
                ok = True
        if ok:
            cnt[C_RX_SEGMENTED] += 1
        return ok

    cdef bint put(self, int to, const Seg *src, uint32_t nsrc, uint64_t skip, int64_t length,
                  const uint8_t *vnet_hdr) noexcept nogil:
        """A frame into binding `to`'s RX ring (or TAP), with vnet_hdr's
        offload fields in its virtio-net header (NULL: none)."""
        cdef Binding *dst = &self.bindings[to]
        cdef Seg out
        cdef long w
        if dst.vx != NULL:
            # Queued here, sent with the batch (vx_flush, end of dispatch).
            # A VXLAN port takes no offloads (its caps are 0): what comes here
            # is finished and segmented already (deliver_offload).
            if not vx_queue(dst.vx, dst.tap_cnt, src, nsrc, skip, length):
                return False
            if dst.cap_tx >= 0:
                self.capture(dst.cap_tx, src, nsrc, skip, length)
            return True
        if dst.tap_fd >= 0:
            # One write(2) per frame: the TAP takes one frame per call
            # (after its virtio-net header, with IFF_VNET_HDR).
            out.ptr = self.tap_out + dst.tap_hdr
            out.len = MAX_FRAME
            if length > MAX_FRAME:
                dst.tap_cnt[C_RX_TOO_BIG] += 1
                return False
            if dst.tap_hdr:
                memset(self.tap_out, 0, dst.tap_hdr)
                if vnet_hdr != NULL:
                    memcpy(self.tap_out, vnet_hdr, VNET_HDR_FIELDS)
            copy_segs(&out, 1, 0, src, nsrc, skip, length)
            w = write(dst.tap_fd, self.tap_out, length + dst.tap_hdr)
            if w != length + dst.tap_hdr:
                # Atomic: with several workers, each may write into the TAP.
                vhu_atomic_add_u64(&dst.tap_cnt[C_RX_NO_ROOM], 1)   # queue full (EAGAIN) or link down
                return False
            vhu_atomic_add_u64(&dst.tap_cnt[C_RX_FRAMES], 1)
            vhu_atomic_add_u64(&dst.tap_cnt[C_RX_BYTES], <uint64_t>length)
            if dst.cap_tx >= 0:
                self.capture(dst.cap_tx, src, nsrc, skip, length)
            return True
        if dst.rx == NULL or not dst.rx_enabled:
            return False
        if self.share[to].shared and not self.share[to].held and not self.claim(to):
            return dst.rx_enabled and self.hold_back(to, src, nsrc, skip, length, vnet_hdr)
        dst.rx_dirty = True
        if dev_rx_enqueue_hdr(dst.rx, vnet_hdr, src, nsrc, skip, length) <= 0:
            return False       # counted on dst.rx as rx_no_room / rx_too_big
        if dst.cap_tx >= 0:
            self.capture(dst.cap_tx, src, nsrc, skip, length)
        return True

    cdef uint32_t forward(self, int bi) noexcept nogil:
        """Drain up to a batch from binding bi's TX ring and send each frame
        where its verdict says. Returns chains handled."""
        cdef Binding *b = &self.bindings[bi]
        cdef DevRing *tx = b.tx
        cdef int n = dev_pop_batch(tx, self.batch)
        cdef int i, k, v, m, nframes = 0
        cdef ChainInfo *c
        cdef uint64_t frames = 0, nbytes = 0
        cdef uint32_t hdr = tx.hdr_len
        cdef double t = 0
        cdef timespec ts
        cdef int *members
        cdef bint decide = self.app == APP_SWITCH and self.stage is None
        cdef bint frames_read = (self.stage is not None or b.cap_rx >= 0 or
                                 (self.app != APP_SINK and self.app != APP_SOURCE))
        cdef Seg *s0
        if n <= 0:
            return 0
        # Every frame's first lines (its header, the addresses the switch
        # reads), written last by the front-end's CPU: asked for together,
        # so their transfers overlap instead of each stalling its frame.
        # Only where the frames are read on: sink and source drop what a
        # guest sends after two header bytes, and a line pulled over that
        # is never read only makes the front-end's next write to it miss.
        for i in range(n if frames_read else 0):
            if tx.chains[i].nread:
                s0 = &tx.segs[tx.chains[i].seg_start]
                vhu_prefetch(s0.ptr)
                if s0.len > 64:
                    vhu_prefetch(s0.ptr + 64)
        if self.ncap:
            clock_gettime(CLOCK_REALTIME, &ts)
            self.ts_sec = <uint32_t>ts.tv_sec
            self.ts_usec = <uint32_t>(ts.tv_nsec // 1000)
        if self.app == APP_SWITCH:
            t = now()
        for i in range(n):
            c = &tx.chains[i]
            self.fsrc[i] = &tx.segs[c.seg_start]
            self.fnsrc[i] = c.nread
            self.fskip[i] = hdr
            self.verdict[i] = V_APP
            if vhu_unlikely(c.read_len < hdr):
                tx.counters[C_TX_SHORT] += 1
                self.flen[i] = -1
                continue
            if vhu_unlikely(c.read_len - hdr > MAX_FRAME_LEN):
                tx.counters[C_TX_TOO_BIG] += 1    # never read, never delivered
                self.flen[i] = -1
                continue
            self.flen[i] = c.read_len - hdr
            self.foff[i] = 0
            s0 = &tx.segs[c.seg_start]
            if vhu_unlikely(s0.len < 2 or ((<uint8_t>s0.ptr[0] & VNET_F_NEEDS_CSUM) | <uint8_t>s0.ptr[1])):
                # The header asks for an offload (or is split): checked on
                # a private copy of the whole frame, which is what goes on.
                if not self.take_offload(b, i, tx.counters):
                    continue
            frames += 1
            nbytes += c.read_len - hdr
            if decide and not self.foff[i]:
                self.privatize(i)
            if b.cap_rx >= 0:
                self.capture(b.cap_rx, self.fsrc[i], self.fnsrc[i], self.fskip[i], self.flen[i])
        tx.counters[C_TX_FRAMES] += frames
        tx.counters[C_TX_BYTES] += nbytes
        self.dispatch(bi, n, <int>frames, tx.counters, t)
        dev_push_popped(tx, <uint32_t>n)
        if dev_publish_used(tx):
            signal_eventfd(b.tx_call)
        return <uint32_t>n

    cdef void privatize(self, int i) noexcept nogil:
        """Frame i's first HEAD_COPY bytes (every byte the switch decides
        on) copied out of guest memory; from now on the frame is that copy
        followed by the rest of its guest segments, so what was decided on
        is what gets delivered. A frame in more than HEAD_SEGS segments is
        copied whole instead."""
        cdef uint64_t flen = <uint64_t>self.flen[i]
        cdef uint64_t head = flen if flen < HEAD_COPY else HEAD_COPY
        cdef uint64_t skip = self.fskip[i] + head
        cdef Seg *src = self.fsrc[i]
        cdef uint32_t nsrc = self.fnsrc[i], s = 0, k = 1
        cdef Seg *out = &self.psegs[i * (HEAD_SEGS + 1)]
        out[0].ptr = self.heads + i * HEAD_COPY
        out[0].len = <uint32_t>head
        while s < nsrc and skip >= src[s].len:
            skip -= src[s].len
            s += 1
        if nsrc - s > HEAD_SEGS:
            out = &self.whole_segs[i]
            out[0].ptr = self.whole + <size_t>i * MAX_FRAME
            out[0].len = <uint32_t>flen
            copy_segs(out, 1, 0, src, nsrc, self.fskip[i], flen)
        else:
            if head == HEAD_COPY and src[0].len >= self.fskip[i] + HEAD_COPY:
                # The common frame, its head all in the first segment: a
                # copy of constant size, which the compiler inlines.
                memcpy(out[0].ptr, src[0].ptr + self.fskip[i], HEAD_COPY)
            else:
                copy_segs(out, 1, 0, src, nsrc, self.fskip[i], head)
            while s < nsrc:
                out[k].ptr = src[s].ptr + skip
                out[k].len = <uint32_t>(src[s].len - skip)
                skip = 0
                k += 1
                s += 1
        self.fsrc[i] = out
        self.fnsrc[i] = k if out != &self.whole_segs[i] else 1
        self.fskip[i] = 0

    cdef uint32_t forward_tap(self, int bi) noexcept nogil:
        """Read up to a batch of frames from binding bi's TAP and send each
        where its verdict says. Returns frames handled."""
        cdef Binding *b = &self.bindings[bi]
        cdef uint64_t *cnt = b.tap_cnt + C_COUNT       # the "TX ring" half: frames from it
        cdef int n = 0
        cdef long r
        cdef uint64_t nbytes = 0
        cdef timespec ts
        cdef double t = 0
        cdef uint32_t hdr = b.tap_hdr
        cdef uint8_t *h
        while n < <int>self.batch:
            h = <uint8_t *>self.tap_in + <size_t>n * TAP_SLOT
            r = read(b.tap_fd, h, MAX_FRAME + hdr)
            if r <= 0:
                break                 # EAGAIN: nothing more now
            if r < hdr:
                cnt[C_TX_SHORT] += 1
                continue
            if r - hdr > MAX_FRAME_LEN:     # cut to the buffer by read(2): not a whole frame
                cnt[C_TX_TOO_BIG] += 1
                continue
            self.tap_segs[n].ptr = <char *>h
            self.tap_segs[n].len = <uint32_t>r
            self.fsrc[n] = &self.tap_segs[n]
            self.fnsrc[n] = 1
            self.fskip[n] = hdr
            self.flen[n] = r - hdr
            self.verdict[n] = V_APP
            self.foff[n] = 0
            if hdr and vhu_unlikely((h[0] & VNET_F_NEEDS_CSUM) | h[1]):
                if not self.take_offload(b, n, cnt):
                    continue
            nbytes += r - hdr
            n += 1
        if n == 0:
            return 0
        if self.ncap:
            clock_gettime(CLOCK_REALTIME, &ts)
            self.ts_sec = <uint32_t>ts.tv_sec
            self.ts_usec = <uint32_t>(ts.tv_nsec // 1000)
            if b.cap_rx >= 0:
                for r in range(n):
                    self.capture(b.cap_rx, self.fsrc[r], 1, self.fskip[r], self.flen[r])
        if self.app == APP_SWITCH:
            t = now()
        cnt[C_TX_FRAMES] += n
        cnt[C_TX_BYTES] += nbytes
        self.dispatch(bi, n, n, cnt, t)
        return <uint32_t>n

    cdef uint32_t forward_vxlan(self, int bi) noexcept nogil:
        """Read up to a batch of datagrams from binding bi's VXLAN socket
        (one recvmmsg; bi reads for every port sharing its socket) and send
        each good inner frame where its verdict says, as a frame from the
        port of its VNI. Returns datagrams handled."""
        cdef Binding *b = &self.bindings[bi]
        cdef Binding *sb
        cdef VxPort *p = b.vx
        cdef uint64_t *cnt
        cdef uint64_t nbytes
        cdef uint32_t handled = 0
        cdef timespec ts
        cdef double t = now()
        cdef int i, k, m, sbi
        cdef int n = vx_receive(p, self.batch, self.tap_segs, self.vx_owner, &handled, t)
        if n <= 0:
            return handled
        if self.ncap:
            clock_gettime(CLOCK_REALTIME, &ts)
            self.ts_sec = <uint32_t>ts.tv_sec
            self.ts_usec = <uint32_t>(ts.tv_nsec // 1000)
        for k in range(p.nshared):
            # The frames of one port, in the order they came.
            sbi = p.shared_bind[k]
            sb = &self.bindings[sbi]
            m = 0
            nbytes = 0
            for i in range(n):
                if self.vx_owner[i] != k:
                    continue
                self.fsrc[m] = &self.tap_segs[i]
                self.fnsrc[m] = 1
                self.fskip[m] = 0
                self.flen[m] = self.tap_segs[i].len
                self.verdict[m] = V_APP
                self.foff[m] = 0             # no virtio-net header: a plain frame
                nbytes += self.tap_segs[i].len
                if sb.cap_rx >= 0:
                    self.capture(sb.cap_rx, self.fsrc[m], 1, 0, self.flen[m])
                m += 1
            if m == 0:
                continue
            cnt = sb.tap_cnt + C_COUNT       # the "TX ring" half: frames from it
            cnt[C_TX_FRAMES] += m
            cnt[C_TX_BYTES] += nbytes
            self.dispatch(sbi, m, m, cnt, t)
        return handled

    cdef void dispatch(self, int bi, int n, int frames, uint64_t *cnt, double t) noexcept nogil:
        """Frames 0..n of the current batch (flen < 0: skip) from binding bi:
        the stage's verdicts, then the app's; deliver; publish the receivers."""
        cdef Binding *b = &self.bindings[bi]
        cdef int i, k, v, m
        cdef int *members
        cdef bint notify
        if self.stage is not None and frames:
            with gil:
                self.call_stage(bi, n, frames)
        members = self.members[b.group]
        self.last_src_port = -1        # the switch's memory is for one batch
        self.last_dst_known = False
        for i in range(n):
            if self.flen[i] < 0:
                continue
            v = self.verdict[i]
            if v == V_APP:
                if ((b.tx != NULL and not b.tx_enabled) or self.app == APP_SINK
                        or self.app == APP_PCAP or self.app == APP_SOURCE):
                    continue
                if self.app == APP_SWITCH:
                    v = self.switch_out(b, i, t, cnt)
                    if v == -2:
                        for k in range(self.nmembers[b.group]):
                            m = members[k]
                            if m != bi:
                                self.deliver(i, m)
                    elif v >= 0:
                        self.deliver(i, v)
                    continue
                v = b.peer              # echo, patch
                if v < 0:
                    continue
            elif v < 0:
                cnt[C_DROP_STAGE if v == V_DROP else C_DROP_STAGE_ERROR] += 1
                continue
            else:
                v = self.port_bind[b.group][v] if v < MAX_PORTS else -1
                if v < 0:
                    cnt[C_DROP_NO_PORT] += 1
                    continue
            if not self.deliver(i, v) and self.bindings[v].tap_fd < 0 and \
                    self.bindings[v].vx == NULL and (
                    self.bindings[v].rx == NULL or not self.bindings[v].rx_enabled):
                cnt[C_RX_NO_ROOM] += 1      # no receiving ring at all
        for k in range(self.nmembers[b.group]):
            m = members[k]
            if self.bindings[m].rx_dirty:
                self.bindings[m].rx_dirty = False
                notify = dev_publish_used(self.bindings[m].rx)
                if self.share[m].held:
                    self.share[m].held = False
                    rx_unlock(self.bindings[m].rx)
                if notify:
                    signal_eventfd(self.bindings[m].rx_call)
            elif self.bindings[m].vx != NULL and self.bindings[m].vx.nslots:
                vx_flush(self.bindings[m].vx, self.bindings[m].tap_cnt)
            self.share[m].busy = False

    # -- RX rings other workers write too (_shared.pxi) -----------------------

    cdef bint claim(self, int to) noexcept nogil:
        """Take binding `to`'s RX-ring lock for the rest of this batch (its
        backlog goes in first); False if another worker holds it."""
        cdef RxShare *s = &self.share[to]
        cdef DevRing *rx = self.bindings[to].rx
        cdef int rc
        if s.busy:
            return False
        rc = rx_lock(rx, self.holder, s.epoch)
        if rc <= 0:
            s.busy = True                 # not tried again before the next batch
            if rc < 0:
                self.bindings[to].rx_enabled = False    # stale: the ring runs a newer start
            else:
                vhu_atomic_add_u64(&rx.counters[C_RX_CONTENDED], 1)
            return False
        s.held = True
        self.bindings[to].rx_dirty = True
        if s.n:
            self.flush_backlog(to)
        return True

    cdef bint hold_back(self, int to, const Seg *src, uint32_t nsrc, uint64_t skip,
                        int64_t length, const uint8_t *vnet_hdr) noexcept nogil:
        """A frame for a ring another worker holds: into our backlog for it,
        with its virtio-net header's offload fields (NULL: none)."""
        cdef RxShare *s = &self.share[to]
        if not backlog_push(s, src, nsrc, skip, length, vnet_hdr):
            vhu_atomic_add_u64(&self.bindings[to].rx.counters[C_RX_NO_ROOM], 1)
            return False
        if s.n == 1:
            self.backlogged += 1
        return True

    cdef void flush_backlog(self, int to) noexcept nogil:
        """Enqueue binding `to`'s backlog, in order (its lock held)."""
        cdef RxShare *s = &self.share[to]
        cdef Binding *dst = &self.bindings[to]
        cdef Seg seg
        cdef uint32_t k
        for k in range(s.n):
            seg.ptr = s.buf + s.off[k]
            seg.len = s.len[k]
            if dev_rx_enqueue_hdr(dst.rx, &s.hdr[k * VNET_HDR_FIELDS] if s.has_hdr[k] else NULL,
                                  &seg, 1, 0, s.len[k]) > 0 and dst.cap_tx >= 0:
                self.capture(dst.cap_tx, &seg, 1, 0, s.len[k])
        s.n = 0
        s.used = 0
        self.backlogged -= 1

    cdef uint32_t retry_backlogs(self) noexcept nogil:
        """Once a round while frames wait: every backlog whose lock is free now."""
        cdef int i
        cdef uint32_t done = 0, n
        cdef Binding *b
        cdef int rc
        if self.ncap:
            self.stamp()
        for i in range(self.nbind):
            if self.share[i].n == 0:
                continue
            b = &self.bindings[i]
            if b.rx == NULL or not b.rx_enabled:
                continue                      # waits for the ring (or a rebind) to come back
            rc = rx_lock(b.rx, self.holder, self.share[i].epoch)
            if rc < 0:
                b.rx_enabled = False          # stale: dropped at the rebind that follows
                continue
            if rc == 0:
                continue
            n = self.share[i].n
            self.flush_backlog(i)
            done += n
            if dev_publish_used(b.rx):
                rx_unlock(b.rx)
                signal_eventfd(b.rx_call)
            else:
                rx_unlock(b.rx)
        return done

    cdef void drain_backlogs(self, double seconds) noexcept nogil:
        """Before the bindings change: flush what waits, trying for up to
        `seconds`; what is still held back then is dropped (rx_no_room)."""
        cdef double until = now() + seconds
        cdef int i
        while self.backlogged and now() < until:
            self.retry_backlogs()
            if self.backlogged:
                sched_yield()
        for i in range(MAX_BINDINGS):
            if self.share[i].n:
                if i < self.nbind and self.bindings[i].rx != NULL:
                    vhu_atomic_add_u64(&self.bindings[i].rx.counters[C_RX_NO_ROOM],
                                       self.share[i].n)
                self.share[i].n = 0
                self.share[i].used = 0
        self.backlogged = 0

    cdef void stamp(self) noexcept nogil:
        cdef timespec ts
        clock_gettime(CLOCK_REALTIME, &ts)
        self.ts_sec = <uint32_t>ts.tv_sec
        self.ts_usec = <uint32_t>(ts.tv_nsec // 1000)

    def set_worker(self, int index, int generation=0):
        """This engine is worker `index`, after `generation` replacements:
        the holder its RX-ring locks record (vhu.workers.shared.holder_word)."""
        if not 0 <= index < 0xFFFF or generation < 0:
            raise ValueError("worker index out of range")
        self.holder = ((<uint64_t>generation & 0xFFFF) << 16) | (<uint64_t>index + 1)

    def set_mac_memory(self, buffer, Py_ssize_t offset=0):
        """Use the MAC table at buffer[offset:] (shared with the other
        workers: vhu.workers.shared.MacMemory) instead of a private one."""
        cdef unsigned char[::1] mv = buffer
        if offset < 0 or offset % 64 or offset + MAC_SLOTS * sizeof(SharedMac) > mv.shape[0]:
            raise ValueError(f"the MAC table needs {MAC_SLOTS * sizeof(SharedMac)} aligned bytes")
        self.smacs_owner = buffer
        self.smacs = <SharedMac *>&mv[offset]

    def begin_shared_ring(self, DeviceRing ring, uint64_t epoch, uint64_t position,
                          double timeout=0.2):
        """This worker owns `ring` (an RX ring others write too) and starts it
        afresh: its shared position and epoch set under its lock (rx_begin)."""
        cdef bint took
        cdef DevRing *r = ring.ring()
        with nogil:
            took = rx_begin(r, self.holder, epoch, position, timeout)
        return took

    def shared_state(self):
        """For tests and `show`: (port, queue) of each binding whose RX ring
        is shared, with the frames waiting in its backlog."""
        return {(self.bindings[i].port, self.bindings[i].group): self.share[i].n
                for i in range(self.nbind) if self.share[i].shared}

    cdef void call_stage(self, int bi, int n, int nframes) noexcept:
        """Run the Python stage on the batch (GIL held). A raising or
        misbehaving stage drops the batch, is logged (rate-limited) and never
        stops the worker."""
        cdef int i
        try:
            self.run_stage(bi, n)
        except BaseException:
            self.stage_errors += 1
            for i in range(n):
                self.verdict[i] = V_ERROR      # counted as drop_stage_error
            tnow = _time.monotonic()
            if tnow - self.last_error_log >= 1.0:
                extra = (f" ({self.errors_unlogged} more failed batches since the last report)"
                         if self.errors_unlogged else "")
                log.error("pipeline stage failed on a batch of %d frames from port %d "
                          "queue %d; the batch is dropped%s\n%s", nframes,
                          self.bindings[bi].port, self.bindings[bi].group, extra,
                          traceback.format_exc())
                self.last_error_log = tnow
                self.errors_unlogged = 0
            else:
                self.errors_unlogged += 1

    cdef int stage_gather(self, int bi, int n) noexcept nogil:
        """Copy every frame of the batch into the stage's scratch (the
        stage decides on, edits and sends these copies, never live guest
        memory) and fill its metadata. Returns the number of frames."""
        cdef Binding *b = &self.bindings[bi]
        cdef int i, j = 0
        cdef uint64_t soff = 0
        cdef Meta *m
        for i in range(n):
            if self.flen[i] < 0:
                continue
            m = &self.meta[j]
            self.stage_index[j] = i
            j += 1
            m.port = b.port
            m.queue = b.group
            m.length = <uint32_t>self.flen[i]
            self.gathered[i].ptr = self.scratch + soff
            self.gathered[i].len = <uint32_t>self.flen[i]
            copy_segs(&self.gathered[i], 1, 0, self.fsrc[i], self.fnsrc[i], self.fskip[i],
                      self.flen[i])
            self.fsrc[i] = &self.gathered[i]
            self.fnsrc[i] = 1
            self.fskip[i] = 0
            m.buf = 0
            m.offset = soff
            header_fields(m, <uint8_t *>self.gathered[i].ptr, self.flen[i])
            if self.foff[i]:
                m.flags = self.finfo[i].flags
                m.gso_type = self.finfo[i].gso_type
                m.gso_size = self.finfo[i].gso_size
                m.csum_start = self.finfo[i].csum_start
                m.csum_offset = self.finfo[i].csum_offset
            else:
                m.flags = m.gso_type = 0
                m.gso_size = m.csum_start = m.csum_offset = 0
            soff += (<uint64_t>self.flen[i] + 63) & ~<uint64_t>63   # frames on their own lines
        return j

    cdef int run_stage(self, int bi, int n) except -1:
        """Call the stage once on the gathered batch, read its verdicts."""
        cdef int j, k
        cdef long long[:] verdicts
        with nogil:
            j = self.stage_gather(bi, n)
        if j == 0:
            return 0
        out = self.stage(self.meta_arr[:j], [self.scratch_arr])
        if out is None:
            return 0
        verdicts = np.ascontiguousarray(out, dtype=np.longlong).reshape(-1)
        if verdicts.shape[0] != j:
            raise ValueError(f"stage returned {verdicts.shape[0]} verdicts for {j} frames")
        for k in range(j):
            if verdicts[k] < -2 or verdicts[k] >= MAX_PORTS:
                raise ValueError(f"verdict {verdicts[k]} (frame {k}) is not -2, -1 or a port")
        for k in range(j):
            self.verdict[self.stage_index[k]] = <int>verdicts[k]
        return 0

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
            if b.cap_tx >= 0:
                self.capture(b.cap_tx, &s, 1, 0, self.frame_len)
        if done and dev_publish_used(b.rx):
            signal_eventfd(b.rx_call)
        return done

    cdef uint64_t round(self) noexcept nogil:
        cdef int i
        cdef uint64_t work = 0
        cdef Binding *b
        cdef timespec ts
        if self.backlogged:
            work += self.retry_backlogs()
        for i in range(self.nbind):
            b = &self.bindings[i]
            if self.app == APP_SOURCE:
                if self.ncap:
                    clock_gettime(CLOCK_REALTIME, &ts)
                    self.ts_sec = <uint32_t>ts.tv_sec
                    self.ts_usec = <uint32_t>(ts.tv_nsec // 1000)
                work += self.generate(b)
            if b.tx != NULL:
                work += self.forward(i)
            elif b.tap_fd >= 0 and not self.share[i].tap_write_only:
                work += self.forward_tap(i)
            elif b.vx != NULL and b.vx.reader:
                work += self.forward_vxlan(i)
        if self.nlog_calls:
            self.signal_log_updates()
        return work

    cdef void signal_log_updates(self) noexcept nogil:
        """SET_LOG_FD: after a round that marked pages in the dirty log, the
        front-end's eventfd is signalled (once per queue pair and round, not
        per page); the ring core only counts what it marked."""
        cdef int i
        cdef uint64_t marks
        cdef Binding *b
        for i in range(self.nbind):
            b = &self.bindings[i]
            if b.log_call < 0:
                continue
            marks = log_marks(b)
            if marks != b.log_seen:
                b.log_seen = marks
                signal_eventfd(b.log_call)

    cdef bint sleep(self, int timeout_ms) noexcept nogil:
        """Re-enable notifications, re-check, sleep on the kick fds.
        Returns True if the control socket woke us."""
        cdef int i, n
        cdef bint raced = False, ctrl = False
        cdef Binding *b
        cdef epoll_event events[64]
        cdef uint32_t tag
        cdef uint64_t kicks
        cdef int sockerr = 0
        cdef socklen_t sockerr_len
        for i in range(self.nbind):
            b = &self.bindings[i]
            # After enabling, re-check: a chain made available before the
            # driver saw the flag would otherwise wait for a kick never sent.
            if b.tx != NULL and dev_notifications_on(b.tx):
                raced = True
            if b.rx != NULL and (self.app == APP_SOURCE) and dev_notifications_on(b.rx):
                raced = True
        if not raced:
            self.flush_captures()        # an idle worker leaves complete files behind
            self.sleeps += 1
            n = epoll_wait(self.epfd, events, 64, timeout_ms)
            for i in range(n if n > 0 else 0):
                tag = <uint32_t>(events[i].data.u64 >> 32)
                if tag == CTRL_TAG:
                    ctrl = True
                    continue
                b = NULL
                if (tag >> 2) < <uint32_t>self.nbind:
                    b = &self.bindings[tag >> 2]
                if (tag & 3) == KIND_VXLAN:
                    # Datagrams: read by forward_vxlan. An error pending on
                    # a UDP socket (an ICMP report) is cleared, not fatal.
                    if events[i].events & EPOLLERR:
                        sockerr_len = sizeof(int)
                        getsockopt(<int><uint32_t>events[i].data.u64, SOL_SOCKET, SO_ERROR,
                                   &sockerr, &sockerr_len)
                    continue
                if events[i].events & (EPOLLERR | EPOLLHUP):
                    # Level-triggered: left in the set, this fd would wake
                    # us at once, forever (a spinning idle worker).
                    self.fd_failed(b, tag & 3, <int><uint32_t>events[i].data.u64)
                    continue
                if (tag & 3) == KIND_TAP:
                    continue                  # a TAP with frames: read by forward_tap
                kicks = drain_eventfd(<int><uint32_t>events[i].data.u64)
                if b != NULL:
                    if (tag & 3) == KIND_TX_KICK and b.tx != NULL:
                        b.tx.counters[C_KICKS] += kicks
                    elif (tag & 3) == KIND_RX_KICK and b.rx != NULL:
                        b.rx.counters[C_KICKS] += kicks
            self.wakeups += 1
            self.beat[0] += 1
        for i in range(self.nbind):
            b = &self.bindings[i]
            if b.tx != NULL:
                dev_notifications_off(b.tx)
            if b.rx != NULL:
                dev_notifications_off(b.rx)
        return ctrl

    cdef void fd_failed(self, Binding *b, uint32_t kind, int fd) noexcept nogil:
        """A kick or TAP fd reported an error or hang-up: stop watching it
        and stop what it fed (a kick fd's ring is broken: the front-end gave
        us something that is not a working notifier)."""
        cdef epoll_event ev
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, &ev)
        if b == NULL:
            return
        if kind == KIND_TX_KICK and b.tx != NULL:
            dev_mark_broken(b.tx, B_KICK_FD_ERROR)
            b.tx_kick = -1
        elif kind == KIND_RX_KICK and b.rx != NULL:
            dev_mark_broken(b.rx, B_KICK_FD_ERROR)
            b.rx_kick = -1
        elif kind == KIND_TAP and b.tap_cnt != NULL:
            b.tap_cnt[C_BROKEN_FIRST + B_KICK_FD_ERROR] += 1
            b.tap_fd = -1                     # the TAP port stops; the master closes it

    def run(self, double max_seconds=1.0):
        """Process the bound queues until the control fd is readable or
        max_seconds pass. Returns the number of chains handled."""
        cdef uint64_t total = 0, work = 0, rounds = 0
        # One tick read a round, at its start: the round before was busy if
        # it moved anything, and a busy round neither sleeps nor yields, so
        # all of the time since the last read was work.
        cdef uint64_t tick, last_tick = vhu_poll_ticks()
        cdef uint64_t poll_ticks = self.load[0], busy_ticks = self.load[1]
        # An idle worker stays asleep across run() calls (the control check
        # returns every max_seconds) instead of spinning idle_spins rounds
        # again each time.
        cdef uint64_t idle = self.idle_rounds
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
            # No kicks while we poll: on the TX rings they would wake nobody,
            # and on the RX rings a front-end refilling buffers would pay a
            # syscall per refill (only the source app sleeps waiting for RX
            # buffers; every other app drops a frame that finds none).
            for i in range(self.nbind):
                if self.bindings[i].tx != NULL:
                    dev_notifications_off(self.bindings[i].tx)
                if self.bindings[i].rx != NULL:
                    dev_notifications_off(self.bindings[i].rx)
            while not stop:
                tick = vhu_poll_ticks()
                poll_ticks += tick - last_tick
                if work:
                    busy_ticks += tick - last_tick
                last_tick = tick
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
                        self.beat[0] += 1
                        self.load[0] = poll_ticks
                        self.load[1] = busy_ticks
                        pfd.revents = 0
                        if self.ctrl_fd >= 0 and poll(&pfd, 1, 0) > 0:
                            break
                    if t >= deadline:
                        break
                if not work and not self.backlogged and (self.poll_mode == POLL_EPOLL or
                                 (self.poll_mode == POLL_ADAPTIVE and idle >= self.idle_spins)):
                    stop = self.sleep(1 if polled_rings else 100)
                    if now() >= deadline:
                        break
                elif idle >= YIELD_AFTER_IDLE_ROUNDS:
                    # Spinning on empty rings: let any other runnable task on
                    # this CPU (another worker pinned here, a front-end) go
                    # first. Alone on the CPU this returns at once; with four
                    # workers on one CPU it keeps a worker from spinning out
                    # its time slice while the others' rings are full. Not on
                    # the first empty rounds: a syscall there adds latency to
                    # a ping-pong (echo) loop that is only briefly empty.
                    sched_yield()
            self.flush_captures()
            tick = vhu_poll_ticks()
            self.load[0] = poll_ticks + (tick - last_tick)
            self.load[1] = busy_ticks + (tick - last_tick if work else 0)
        self.idle_rounds = idle
        return total
