"""A virtio-net driver over vhost-user: what QEMU or DPDK virtio-user does for a back-end.

Set-up follows the spec's front-end sequence ("Starting and stopping
rings", "Multiple queue support"): SET_OWNER; GET_FEATURES; with
PROTOCOL_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK) and
GET_QUEUE_NUM; SET_FEATURES; SET_MEM_TABLE with one memfd; per ring
SET_VRING_NUM, SET_VRING_BASE, SET_VRING_ADDR, SET_VRING_CALL,
SET_VRING_KICK; then SET_VRING_ENABLE (only with PROTOCOL_FEATURES: without
it the back-end enables rings itself). Teardown: GET_VRING_BASE per ring
(which stops it), then close.

Memory: one memfd, mapped here through vhu._mem.GuestMemory and sent to the
back-end; rings and buffer slots are carved out of it. Queue 2i is receiveq
i, 2i+1 transmitq i (virtio-net 5.1.2).
"""
import fcntl
import logging
import mmap
import os
import select
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from vhu._mem import GuestMemory
from vhu._ring import DriverRing, packed_ring_layout, split_ring_layout, check_queue_size
from vhu.netqueues import RECEIVEQ, TRANSMITQ, is_transmitq, ring_index
from vhu.protocol.messages import VRING_F_LOG, ProtocolFeature as PF, VirtioFeature as VF, mask

from . import _traffic
from .client import Client, FrontendError

log = logging.getLogger(__name__)

GPA_BASE = 0x100000             # where the memfd sits in "guest-physical" space
PAGE = 4096
MIN_PKT, MAX_PKT = _traffic.MIN_PKT_SIZE, 9216
MAX_QUEUES = 64

DEFAULT_FEATURES = mask(VF.VERSION_1, VF.MRG_RXBUF, VF.EVENT_IDX, VF.PROTOCOL_FEATURES)
# Legacy: a pre-1.0 driver without mergeable buffers (10-byte header) and without
# PROTOCOL_FEATURES, like the Vapp reference client or an old guest.
LEGACY_FEATURES = mask(VF.EVENT_IDX)
PROTOCOL_WANTED = mask(PF.MQ, PF.REPLY_ACK)
LOG_PAGE = 4096                 # VHOST_LOG_PAGE: a bit of the dirty log per guest page
_SEALS = getattr(fcntl, "F_SEAL_SHRINK", 2) | getattr(fcntl, "F_SEAL_GROW", 4)


@dataclass
class LogCheck:
    """What --log found after the run: pages of the RX buffers and used rings
    whose bytes changed while logging was on, and which of them the log
    does not mark (the back-end missed them: a migration would lose them)."""
    changed: int
    marked_total: int
    unmarked: list

    def summary(self) -> str:
        state = "all marked" if not self.unmarked else (
            f"{len(self.unmarked)} NOT marked (first at gpa {self.unmarked[0]:#x})")
        return (f"log: {self.changed} pages written by the back-end while logging, {state}; "
                f"{self.marked_total} pages marked in all")


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


@dataclass
class Result:
    """What one run moved. Bytes are frame bytes (virtio-net header excluded),
    as the back-ends count them."""
    mode: str
    seconds: float
    tx_packets: int = 0
    tx_bytes: int = 0
    rx_packets: int = 0
    rx_bytes: int = 0
    corrupt: int = 0
    missing: int = 0
    out_of_order: int = 0
    kicks: int = 0
    per_second: list = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.corrupt + self.missing + self.out_of_order

    def rate(self, direction: str):
        """(Mpps, Gbps) of 'tx' or 'rx' over the run."""
        t = max(self.seconds, 1e-9)
        return (getattr(self, f"{direction}_packets") / t / 1e6,
                getattr(self, f"{direction}_bytes") * 8 / t / 1e9)

    def summary(self) -> str:
        parts = [f"summary: {self.mode} {self.seconds:.2f} s"]
        for d in ("tx", "rx"):
            mpps, gbps = self.rate(d)
            parts.append(f"{d} {getattr(self, d + '_packets')} packets "
                         f"{getattr(self, d + '_bytes')} bytes {mpps:.3f} Mpps {gbps:.3f} Gbps")
        err = f"errors {self.errors}"
        if self.mode == "loop":
            err += (f" (corrupt {self.corrupt}, missing {self.missing}, "
                    f"out of order {self.out_of_order})")
        parts.append(err)
        return " | ".join(parts)


def rate_line(t: float, now: dict, before: dict, dt: float) -> str:
    out = [f"{t:6.1f} s"]
    for d in ("tx", "rx"):
        p = now[d + "_packets"] - before[d + "_packets"]
        b = now[d + "_bytes"] - before[d + "_bytes"]
        out.append(f"{d} {p / dt / 1e6:7.3f} Mpps {b * 8 / dt / 1e9:7.3f} Gbps")
    errs = sum(now[k] - before[k] for k in ("corrupt", "missing", "out_of_order"))
    out.append(f"errors {errs}")
    return " | ".join(out)


class Frontend:
    """A vhost-user front-end (virtio-net driver) with a compiled data path.

        with Frontend("/tmp/vhost.sock") as fe:          # connect, negotiate, start
            result = fe.run("tx", duration=2)           # or "rx", "loop"
        print(result.summary())

    listen=True creates the socket and waits for a back-end in client mode.
    legacy=True negotiates neither VERSION_1 nor MRG_RXBUF nor
    PROTOCOL_FEATURES (10-byte header); packed=True asks for VIRTIO_F_RING_PACKED.
    features overrides the virtio features asked for (only offered ones are taken).
    """

    def __init__(self, socket_path: str, listen: bool = False, queues: int = 1,
                 ring_size: int = 256, packed: bool = False, legacy: bool = False,
                 features: Optional[int] = None, pkt_size: int = 64, timeout: float = 10.0,
                 log: bool = False, log_notices: bool = False):
        if not 1 <= queues <= MAX_QUEUES:
            raise ValueError(f"queues {queues}: 1..{MAX_QUEUES}")
        check_queue_size(ring_size, packed)
        if not MIN_PKT <= pkt_size <= MAX_PKT:
            raise ValueError(f"packet size {pkt_size}: {MIN_PKT}..{MAX_PKT}")
        if legacy and packed:
            raise ValueError("packed rings need VERSION_1, which legacy mode does not negotiate")
        if legacy and queues > 1:
            raise ValueError("several queue pairs need PROTOCOL_FEATURES (MQ), which legacy "
                             "mode does not negotiate")
        self.path = socket_path
        self.listen = listen
        self.queues = queues
        self.ring_size = ring_size
        self.packed = packed
        self.legacy = legacy
        self.pkt_size = pkt_size
        self.timeout = timeout
        if features is None:
            features = LEGACY_FEATURES if legacy else DEFAULT_FEATURES
            if queues > 1:
                features |= mask(VF.MQ)
            if packed:
                features |= mask(VF.RING_PACKED)
        elif bool(features >> VF.RING_PACKED & 1) != packed:
            raise ValueError("features and packed disagree about VIRTIO_F_RING_PACKED")
        self.wanted = features
        self.features = 0               # negotiated
        self.protocol_features = 0
        self.client: Optional[Client] = None
        self.mem: Optional[GuestMemory] = None
        self.memfd = -1
        self.rings = []                 # DriverRing per queue index
        self.kick_fds = []
        self.call_fds = []
        self.started = False
        self.bases = None               # GET_VRING_BASE replies, after stop()
        self.log = log                  # dirty-page logging on after start (as a migration)
        self.log_fd = -1
        self.log_notices = log_notices  # with log: SET_LOG_FD, an eventfd the back-end signals
        self.log_call_fd = -1
        self.log_map = None
        self.log_size = 0
        self._log_before = None

    # -- lifecycle ----------------------------------------------------------

    def __enter__(self) -> "Frontend":
        try:
            self.connect()
            self.negotiate()
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        self.client = Client(self.path, listen=self.listen, timeout=self.timeout)

    def negotiate(self) -> int:
        """Agree on virtio (and protocol) features; returns the virtio features."""
        c = self._client()
        c.set_owner()
        offered = c.get_features()
        want = self.wanted
        missing = want & mask(VF.RING_PACKED, VF.MQ) & ~offered
        if missing:
            raise FrontendError(f"the back-end does not offer feature bits {missing:#x} "
                                f"({', '.join(f.name for f in VF if missing >> f & 1)})")
        features = want & offered
        if self.log and not offered & mask(VF.LOG_ALL):
            raise FrontendError("the back-end does not offer VHOST_F_LOG_ALL (no migration)")
        if features & mask(VF.PROTOCOL_FEATURES):
            offered_pf = c.get_protocol_features()
            pf = offered_pf & (PROTOCOL_WANTED | (mask(PF.LOG_SHMFD) if self.log else 0))
            if self.log and not pf & mask(PF.LOG_SHMFD):
                raise FrontendError("the back-end does not offer protocol feature LOG_SHMFD")
            c.set_protocol_features(pf)
            self.protocol_features = pf
            if self.queues > 1:
                if not pf & mask(PF.MQ):
                    raise FrontendError("the back-end does not offer protocol feature MQ")
                n = c.get_queue_num()
                if n < self.queues:
                    raise FrontendError(f"the back-end serves {n} queue pairs, "
                                        f"{self.queues} asked")
        elif self.queues > 1:
            raise FrontendError("several queue pairs need PROTOCOL_FEATURES, not offered")
        elif self.log:
            raise FrontendError("dirty logging needs PROTOCOL_FEATURES (LOG_SHMFD)")
        c.set_features(features)
        self.features = features
        log.info("features %#x (offered %#x), protocol features %#x, header %d bytes",
                 features, offered, self.protocol_features, self.hdr_len)
        return features

    @property
    def hdr_len(self) -> int:
        return 12 if self.features & mask(VF.VERSION_1, VF.MRG_RXBUF) else 10

    @property
    def mergeable(self) -> bool:
        return bool(self.features & mask(VF.MRG_RXBUF))

    @property
    def tx_slot(self) -> int:
        return _align(self.hdr_len + self.pkt_size, 64)

    @property
    def rx_slot(self) -> int:
        # At least 2 KiB, so a peer's 1500-byte frames fit one buffer even
        # without mergeable buffers.
        return max(2048, _align(self.hdr_len + self.pkt_size, 64))

    def _layout(self):
        """Offsets in the memfd: per queue index (desc, avail, used, slots)."""
        n = self.ring_size
        sizes = packed_ring_layout(n) if self.packed else split_ring_layout(n)
        off, out = 0, []
        for q in range(2 * self.queues):
            slot = self.tx_slot if is_transmitq(q) else self.rx_slot
            parts = []
            for s in sizes:
                parts.append(off)
                off = _align(off + s, PAGE)
            parts.append(off)
            off = _align(off + slot * n, PAGE)
            out.append(tuple(parts))
        return out, _align(off, 2 << 20)

    def start(self) -> None:
        """Share memory, set up and start every ring."""
        c = self._client()
        layout, total = self._layout()
        self.memfd = os.memfd_create("vhu-frontend", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, total)
        self.mem = GuestMemory()
        self.mem.set_table([(self.memfd, GPA_BASE, total, 0, 0)])
        # Our own address of the memory: ring addresses are front-end user
        # addresses (SET_VRING_ADDR), as QEMU sends them.
        self.uva = self.mem.translate(GPA_BASE, total)
        c.set_mem_table([(GPA_BASE, total, self.uva, 0)], [self.memfd])
        event_idx = bool(self.features & mask(VF.EVENT_IDX))
        for q, (desc, avail, used, _) in enumerate(layout):
            self.rings.append(DriverRing(self.mem, self.ring_size, GPA_BASE + desc,
                                         GPA_BASE + avail, GPA_BASE + used,
                                         event_idx=event_idx, packed=self.packed))
            self.kick_fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
            self.call_fds.append(os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC))
        # Packed: bits 0-14 the next avail position, 15 its wrap counter (1 at
        # the start); bits 16-31 the same for used (QEMU sends both halves).
        base = 0x8000 | 0x8000 << 16 if self.packed else 0
        for q, (desc, avail, used, _) in enumerate(layout):
            c.set_vring_num(q, self.ring_size)
            c.set_vring_base(q, base)
            c.set_vring_addr(q, self.uva + desc, self.uva + used, self.uva + avail)
            c.set_vring_call(q, self.call_fds[q])
            c.set_vring_kick(q, self.kick_fds[q])
        if self.features & mask(VF.PROTOCOL_FEATURES):
            for q in range(len(layout)):
                c.set_vring_enable(q, True)
        self._slots = [GPA_BASE + parts[3] for parts in layout]
        self._layout_parts, self._total = layout, total
        self.started = True
        if self.log:
            self.start_logging()

    # -- dirty-page logging (vhost-user "Migration") ----------------------------

    def start_logging(self) -> None:
        """What QEMU does when a migration starts (vhost_dev_set_log), on
        running rings: SET_LOG_BASE with a sealed memfd covering all guest
        memory, SET_FEATURES with LOG_ALL, then SET_VRING_ADDR with
        VHOST_VRING_F_LOG and each ring's used-ring guest address. Then the
        areas only the back-end writes are snapshotted (check_log compares)."""
        c = self._client()
        pages = (GPA_BASE + self._total + LOG_PAGE - 1) // LOG_PAGE
        self.log_size = _align((pages + 7) // 8, 8)
        self.log_fd = os.memfd_create("vhu-frontend-log", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.log_fd, _align(self.log_size, PAGE))
        fcntl.fcntl(self.log_fd, fcntl.F_ADD_SEALS, _SEALS)
        self.log_map = mmap.mmap(self.log_fd, _align(self.log_size, PAGE))
        if self.log_notices and self.log_call_fd < 0:
            self.log_call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            c.set_log_fd(self.log_call_fd)
        c.set_log_base(self.log_size, 0, self.log_fd)
        c.set_features(self.features | mask(VF.LOG_ALL))
        for q, (desc, avail, used, _) in enumerate(self._layout_parts):
            c.set_vring_addr(q, self.uva + desc, self.uva + used, self.uva + avail,
                             VRING_F_LOG, GPA_BASE + used)
        # With REPLY_ACK each of these was acknowledged once the workers log.
        self._log_before = [(gpa, self.mem.read(gpa, n)) for gpa, n in self._back_end_areas()]

    def log_notices_since(self) -> int:
        """How many times the back-end signalled SET_LOG_FD's eventfd since the last call."""
        if self.log_call_fd < 0:
            raise FrontendError("no SET_LOG_FD eventfd (log_notices=False)")
        try:
            return os.eventfd_read(self.log_call_fd)
        except BlockingIOError:
            return 0

    def restart_log_check(self) -> None:
        """Clear the log and take the snapshot again: what a migration's next
        dirty-sync round does (QEMU clears the bits it copied)."""
        if self.log_map is None:
            raise FrontendError("dirty logging was not started")
        self.log_map[:self.log_size] = bytes(self.log_size)
        self._log_before = [(gpa, self.mem.read(gpa, n)) for gpa, n in self._back_end_areas()]

    def stop_logging(self) -> None:
        """What QEMU does when a migration fails or is cancelled: LOG_ALL off,
        VHOST_VRING_F_LOG off, on running rings."""
        c = self._client()
        c.set_features(self.features)
        for q, (desc, avail, used, _) in enumerate(self._layout_parts):
            c.set_vring_addr(q, self.uva + desc, self.uva + used, self.uva + avail)

    def _back_end_areas(self):
        """(gpa, bytes) of memory only the back-end writes: each ring's used
        ring (packed: device event area), and the receive rings' buffer slots."""
        n = self.ring_size
        sizes = packed_ring_layout(n) if self.packed else split_ring_layout(n)
        for q, (desc, avail, used, slots) in enumerate(self._layout_parts):
            yield GPA_BASE + used, sizes[2]
            if not is_transmitq(q):
                yield GPA_BASE + slots, self.rx_slot * n

    def logged(self, gpa: int) -> bool:
        page = gpa // LOG_PAGE
        return page // 8 < self.log_size and bool(self.log_map[page // 8] >> (page % 8) & 1)

    def check_log(self) -> LogCheck:
        """After stop() (the back-end writes nothing more): every page of the
        back-end's areas whose bytes changed since logging started must be
        marked in the log."""
        if self._log_before is None:
            raise FrontendError("dirty logging was not started")
        changed, unmarked = 0, []
        for gpa, before in self._log_before:
            after = self.mem.read(gpa, len(before))
            start = gpa // LOG_PAGE * LOG_PAGE
            for page in range(start, gpa + len(before), LOG_PAGE):
                lo, hi = max(page, gpa) - gpa, min(page + LOG_PAGE, gpa + len(before)) - gpa
                if after[lo:hi] != before[lo:hi]:
                    changed += 1
                    if not self.logged(page):
                        unmarked.append(page)
        total = sum(bin(b).count("1") for b in self.log_map[:self.log_size])
        return LogCheck(changed, total, unmarked)

    def _client(self) -> Client:
        if self.client is None:
            raise FrontendError("not connected")
        return self.client

    def traffic(self, mode: str, *, batch: int = 32, poll: str = "busy", count: int = 0):
        """The compiled data path over every queue pair (vhu.frontend._traffic.Traffic)."""
        if not self.started:
            raise FrontendError("rings not started")
        qs = []
        for i in range(self.queues):
            rx, tx = ring_index(i, RECEIVEQ), ring_index(i, TRANSMITQ)
            qs.append((self.rings[tx], self.rings[rx], self.kick_fds[tx], self.kick_fds[rx],
                       self.call_fds[tx], self.call_fds[rx], self._slots[tx], self._slots[rx]))
        return _traffic.Traffic(self.mem, qs, mode, pkt_size=self.pkt_size, hdr_len=self.hdr_len,
                                mergeable=self.mergeable, tx_slot=self.tx_slot,
                                rx_slot=self.rx_slot, batch=batch, poll=poll, count=count)

    def _check_peer(self) -> None:
        """Between slices: a back-end that closed the socket ends the run."""
        sock = self._client().sock
        r, _, _ = select.select([sock], [], [], 0)
        if r:
            try:
                data = sock.recv(4096)     # readable: does not block
            except OSError as e:
                raise FrontendError(f"back-end connection failed: {e.strerror or e}") from None
            if not data:
                raise FrontendError("the back-end closed the connection")
            raise FrontendError(f"unexpected {len(data)} bytes from the back-end")

    def run(self, mode: str = "tx", duration: Optional[float] = None, count: int = 0, *,
            batch: int = 32, poll: str = "busy", drain: float = 2.0, stall: float = 2.0,
            on_second: Optional[Callable[[str], None]] = None) -> Result:
        """Move frames for `duration` seconds or until `count` frames are sent
        (tx, loop) or received (rx), whichever comes first (neither: until
        KeyboardInterrupt). A run bounded by `count` also ends when nothing
        moved for `stall` seconds (a peer that keeps what it gets would hold
        it forever). Then stop sending and wait up to `drain` seconds for
        the back-end to return what is in flight. on_second gets a rate line
        each second."""
        tr = self.traffic(mode, batch=batch, poll=poll, count=count)
        t0 = time.monotonic()
        end = None if duration is None else t0 + duration
        next_tick, last, last_t = t0 + 1.0, tr.counters(), t0
        result = Result(mode, 0.0)
        last_moved, moved_at = last, t0
        try:
            while True:
                now = time.monotonic()
                if end is not None and now >= end:
                    break
                stop_at = min(next_tick, end) if end is not None else next_tick
                if tr.run(min(stop_at - now, 0.25)) < 0:
                    raise FrontendError("the back-end returned a buffer that was not in flight")
                self._check_peer()
                now = time.monotonic()
                if now >= next_tick:
                    cur = tr.counters()
                    line = rate_line(now - t0, cur, last, now - last_t)
                    result.per_second.append(line)
                    if on_second:
                        on_second(line)
                    last, last_t, next_tick = cur, now, next_tick + 1.0
                if count:
                    if self._count_done(tr, mode, count):
                        break
                    moved = tr.counters()
                    if moved != last_moved:
                        last_moved, moved_at = moved, now
                    elif now - moved_at >= stall:
                        log.warning("nothing moved for %.1f s: ending the run", now - moved_at)
                        break
        except KeyboardInterrupt:
            pass
        result.seconds = time.monotonic() - t0
        tr.stop_sending()
        deadline = time.monotonic() + drain
        while time.monotonic() < deadline:
            tx_left, loop_left = tr.in_flight()
            if mode == "rx" or (tx_left == 0 and loop_left == 0):
                break
            if tr.run(0.05) < 0:
                raise FrontendError("the back-end returned a buffer that was not in flight")
        tr.finish()
        for k, v in tr.counters().items():
            setattr(result, k, v)
        return result

    @staticmethod
    def _count_done(tr, mode: str, count: int) -> bool:
        if mode == "rx":
            return tr.done()
        return not tr.sending

    def stop(self) -> list:
        """GET_VRING_BASE on every ring (the back-end stops it); the replies."""
        if not self.started:
            return self.bases or []
        self.started = False
        c = self._client()
        self.bases = [c.get_vring_base(q) for q in range(len(self.rings))]
        return self.bases

    def close(self) -> None:
        """Stop the rings if the back-end is still there, then release every fd and mapping."""
        try:
            if self.started and self.client is not None:
                try:
                    self.stop()
                except FrontendError as e:
                    log.info("stopping rings: %s", e)
        finally:
            self.started = False
            if self.client is not None:
                self.client.close()
                self.client = None
            for fd in self.kick_fds + self.call_fds + ([self.memfd] if self.memfd >= 0 else []):
                os.close(fd)
            self.kick_fds, self.call_fds, self.memfd = [], [], -1
            if self.log_fd >= 0:
                os.close(self.log_fd)
                self.log_fd = -1
            if self.log_call_fd >= 0:
                os.close(self.log_call_fd)
                self.log_call_fd = -1
            if self.log_map is not None:
                self.log_map.close()
                self.log_map = None
            self.rings = []
            if self.mem is not None:
                self.mem.clear()
                self.mem = None
