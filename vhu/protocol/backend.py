"""The back-end state of one vhost-user connection to a virtio-net front-end, sans-I/O.

Spec: vhost-user.rst, "Ring states", "Multiple queue support", "Memory access"
and "Front-end message types"
(https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#ring-states).

NetBackend holds what the front-end told us (features, memory table, rings)
and one handler per supported request, named after it; dispatch.Dispatcher
calls them. The I/O side (the master and its workers) plugs in through
DeviceHooks: after each message the device recomputes every ring's
RingConfig and calls the hooks only for what actually changed.

Security model. Everything in a message comes from a peer we do not trust.
The dispatcher has checked the size, the flags, the fd count and the needed
protocol feature; each handler here still validates every field before it
changes anything: ring indices against the number of rings (a ring beyond
the offered queue pairs refuses the whole set-up, SetupRefused), ring sizes
(1..32768, a power of two, checked again when the features change), ring
addresses (alignment as vhu.ring_layout rules, and the whole descriptor
table / avail ring / used ring inside one memory region), memory regions
(vhu.regions: count, no size 0, no end past 64 bits, no overlap), ring fds
(eventfds only). A refused message leaves the state as it was. The device
owns every fd it keeps (regions, kick/call/err, the back-end channel) and
closes a replaced one once the hooks have heard of the change, and all of
them on RESET_OWNER and close(); fds it does not keep are closed by the
dispatcher. Nothing here maps memory or looks at an fd: the hooks do, and
may refuse a table they cannot map or an fd that is not an eventfd
(ValueError/OSError), which refuses the message.

Effects. A request whose answer depends on the I/O side's work
(GET_VRING_BASE: where did the worker stop the ring?) yields an effect
(dispatch.StopRing) instead of calling a hook, so the I/O side can do that
work without blocking and send the answer back; with synchronous hooks the
device performs its effects itself (perform()).
"""
import logging
from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, Sequence

from vhu import regions as region_rules

from .effects import StopRing
from .messages import (
    VIRTQUEUE_MAX_SIZE, VHOST_MEMORY_BASELINE_NREGIONS, VRING_F_LOG, LogDescription, MemoryTable,
    ProtocolError, ProtocolFeature as PF, SingleMemoryRegion, U64, VirtioFeature as VF, VringAddr,
    VringFile, VringState, mask,
)
from .wire import Message, close_fds
from ..netqueues import queue_pair
from ..ring_layout import MisalignedRing, check_alignment, ring_parts

log = logging.getLogger(__name__)

# Offloads (virtio 1.x 5.1.6.2, 5.1.6.4): what vhu honours in a guest's
# virtio_net_hdr, and what it hands a guest that takes it; the worker does
# the work in software for a receiver that did not negotiate what a frame
# needs (vhu.workers._offload). UFO is not offered.
OFFLOAD_FEATURES = mask(VF.NET_CSUM, VF.NET_GUEST_CSUM, VF.NET_HOST_TSO4, VF.NET_HOST_TSO6,
                        VF.NET_HOST_ECN, VF.NET_GUEST_TSO4, VF.NET_GUEST_TSO6, VF.NET_GUEST_ECN)
SUPPORTED_FEATURES = mask(VF.VERSION_1, VF.MRG_RXBUF, VF.EVENT_IDX, VF.INDIRECT_DESC, VF.MQ,
                          VF.PROTOCOL_FEATURES, VF.RING_PACKED, VF.IN_ORDER, VF.NET_MTU,
                          VF.LOG_ALL) | OFFLOAD_FEATURES
# IN_ORDER costs the device nothing: every app returns the chains it pops in
# the order it popped them (RX chains given back unused are popped again first).
# LOG_ALL with LOG_SHMFD: dirty-page logging for live migration (vhost-user
# "Migration"; QEMU refuses to migrate without them). The log is a memfd the
# front-end shares (SET_LOG_BASE); the workers mark pages (vhu/_ring_log.pxi).
SUPPORTED_PROTOCOL_FEATURES = mask(PF.MQ, PF.REPLY_ACK, PF.BACKEND_REQ, PF.CONFIGURE_MEM_SLOTS,
                                   PF.STATUS, PF.MTU, PF.RARP, PF.LOG_SHMFD)
MTU_MIN, MTU_MAX = 68, 65535          # virtio-net config mtu: a u16, at least IPv4's minimum
MAX_MEM_SLOTS = region_rules.MAX_REGIONS
# The most queue pairs a port may have: what GET_QUEUE_NUM answers at most
# (--queues, Forwarder(queues=)). The wire allows 128 (ring index is 8 bits
# in SET_VRING_KICK/CALL/ERR); the worker engine's tables are sized to this.
MAX_QUEUE_PAIRS = 64
_F_PROTOCOL = 1 << VF.PROTOCOL_FEATURES
_F_PACKED = 1 << VF.RING_PACKED
# The one feature a front-end may flip while rings run: logging starts and
# stops with a migration (QEMU's vhost_dev_set_log), between two batches.
F_LOG_ALL = 1 << VF.LOG_ALL


class SetupRefused(ProtocolError):
    """The front-end set up a ring this port does not offer: more queue pairs
    than GET_QUEUE_NUM said (DPDK virtio-user never asks). Its whole set-up is
    refused, so it cannot run with queues nobody serves: the first message that
    names such a ring fails with the reason (the one warning), and so does every
    later request that changes state, quietly (only RESET_OWNER starts over).
    DPDK gives up at its next acknowledged request ("Failed to set FEATURES_OK
    status", no port probed); QEMU never gets here, it compares GET_QUEUE_NUM
    with its queues= itself."""

    def __init__(self, reason: str, quiet: bool = False):
        super().__init__(reason)
        self.quiet = quiet


def negotiated_offloads(features: int) -> list:
    """The offload features in `features`, by their spec names without
    VIRTIO_NET_F_ (CSUM, GUEST_CSUM, HOST_TSO4, ...): the stats JSON's list."""
    return [f.name[len("NET_"):] for f in VF
            if OFFLOAD_FEATURES >> f.value & 1 and features >> f.value & 1]


def vnet_header_size(features: int) -> int:
    """virtio_net_hdr: 12 bytes with VERSION_1 or MRG_RXBUF (num_buffers), else 10."""
    return 12 if features & mask(VF.VERSION_1, VF.MRG_RXBUF) else 10


class Region(NamedTuple):
    """One memory region as the I/O side needs it; (fd, ...) order as vhu._mem.RegionSpec."""
    fd: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def contains_uva(self, addr: int, length: int) -> bool:
        return (self.userspace_addr <= addr
                and addr + length <= self.userspace_addr + self.memory_size)


def validate_regions(regions, max_regions: int = MAX_MEM_SLOTS) -> None:
    """vhu.regions' rule for a table (its one owner), raising ProtocolError."""
    try:
        region_rules.check_region_table(regions, max_regions)
    except region_rules.RegionTableError as e:
        raise ProtocolError(str(e)) from None


@dataclass(frozen=True)
class RingConfig:
    """Everything the I/O side needs about one ring, as of the last message.

    fds are borrowed: valid until a later ring_changed/reset replaces them
    (dup() one to keep it). -1 means none.
    """
    index: int
    num: int = 0                      # ring size; 0 until SET_VRING_NUM
    desc_addr: int = 0                # front-end user addresses (SET_VRING_ADDR)
    avail_addr: int = 0
    used_addr: int = 0
    log_addr: int = 0
    flags: int = 0
    base: int = 0                     # next avail index to process (SET/GET_VRING_BASE)
    kick_fd: int = -1
    call_fd: int = -1
    err_fd: int = -1
    polling: bool = False             # SET_VRING_KICK with the no-fd flag: poll the ring
    # "Ring states": SET_VRING_KICK starts a ring (the worker may still wait for the
    # first kick before it looks at the ring), GET_VRING_BASE stops it.
    started: bool = False
    enabled: bool = False             # SET_VRING_ENABLE (or all, for legacy front-ends)
    mapped: bool = False              # addresses set and desc/avail/used lie in the memory table
    features: int = 0                 # the negotiated virtio features

    @property
    def ready(self) -> bool:
        """The ring may be processed (normally if enabled, discarding TX if disabled)."""
        return self.started and self.mapped

    @property
    def event_idx(self) -> bool:
        return bool(self.features & (1 << VF.EVENT_IDX))

    @property
    def indirect(self) -> bool:
        return bool(self.features & (1 << VF.INDIRECT_DESC))

    @property
    def net_header_size(self) -> int:
        return vnet_header_size(self.features)

    @property
    def packed(self) -> bool:
        return bool(self.features & _F_PACKED)

    @property
    def log_all(self) -> bool:
        """VHOST_F_LOG_ALL: every write into guest memory is logged."""
        return bool(self.features & F_LOG_ALL)

    @property
    def log_used(self) -> bool:
        """VHOST_VRING_F_LOG: used-ring writes are logged at log_addr."""
        return bool(self.flags & VRING_F_LOG)


class LogArea(NamedTuple):
    """The dirty log SET_LOG_BASE gave (fd borrowed, as a Region's)."""
    fd: int
    size: int
    offset: int


class DeviceHooks(Protocol):
    """How the I/O side learns about changes. Called synchronously, only on transitions."""

    def memory_table_changed(self, regions: Sequence[Region]) -> None:
        """The whole new table (after SET_MEM_TABLE, ADD_MEM_REG, REM_MEM_REG; empty when
        REM_MEM_REG took the last region), before it is committed: raise
        ValueError/OSError to refuse it (the message fails, nothing changes).
        The fds are borrowed; the old table's are closed after this returns.
        Rings whose addresses no longer map are then reported with mapped=False."""

    def ring_changed(self, index: int, ring: RingConfig) -> None:
        """Ring `index`'s config differs from the one last reported."""

    def ring_stop(self, index: int) -> Optional[int]:
        """GET_VRING_BASE on a started ring: stop processing it now and return its real
        last_avail_idx (None: nobody processed it, the device's own base is right).
        Only called by perform() (synchronous hooks); an asynchronous I/O side
        answers the StopRing effect itself."""

    def check_eventfd(self, fd: int) -> None:
        """A kick, call or err fd the front-end sent: raise ValueError unless it
        is an eventfd (vhu signals and drains them as such, non-blocking)."""

    def status_changed(self, status: int) -> None:
        """SET_STATUS changed the virtio device status byte."""

    def send_rarp(self, mac: bytes) -> None:
        """SEND_RARP: announce the guest's MAC (6 bytes) to the network, as if
        the guest had sent a RARP frame (after a migration, so switches learn
        where the guest now is)."""

    def log_changed(self, log: LogArea) -> None:
        """SET_LOG_BASE: the dirty log to mark pages in from now on (replacing
        any earlier one), before it is committed: raise ValueError/OSError to
        refuse it (an fd smaller than offset + size, one that cannot be mapped).
        The fd is borrowed; the old log's is closed after this returns."""

    def log_call_changed(self, fd: int) -> None:
        """SET_LOG_FD: the eventfd to signal after marking pages in the log
        (borrowed: the device keeps it and closes it with the connection)."""

    def reset(self) -> None:
        """Stop every ring and drop the memory table: all fds are about to be closed."""


class NullHooks:
    """Hooks that do nothing: the device alone (tests, dry runs)."""

    def memory_table_changed(self, regions): pass
    def ring_changed(self, index, ring): pass
    def ring_stop(self, index): return None
    def check_eventfd(self, fd): pass
    def status_changed(self, status): pass
    def send_rarp(self, mac): pass
    def log_changed(self, log): pass
    def log_call_changed(self, fd): pass
    def reset(self): pass


@dataclass(frozen=True)
class BackendConfig:
    max_queue_pairs: int = 8
    features: int = SUPPORTED_FEATURES            # offered in GET_FEATURES
    protocol_features: int = SUPPORTED_PROTOCOL_FEATURES
    max_mem_slots: int = VHOST_MEMORY_BASELINE_NREGIONS   # GET_MAX_MEM_SLOTS

    def __post_init__(self):
        if not 1 <= self.max_queue_pairs <= MAX_QUEUE_PAIRS:
            raise ValueError(f"max_queue_pairs {self.max_queue_pairs} not in 1..{MAX_QUEUE_PAIRS}")
        if self.features & ~SUPPORTED_FEATURES:
            raise ValueError(f"features {self.features & ~SUPPORTED_FEATURES:#x} not supported")
        if self.protocol_features & ~SUPPORTED_PROTOCOL_FEATURES:
            raise ValueError(f"protocol features "
                             f"{self.protocol_features & ~SUPPORTED_PROTOCOL_FEATURES:#x} "
                             f"not supported")
        if not 1 <= self.max_mem_slots <= MAX_MEM_SLOTS:
            raise ValueError(f"max_mem_slots {self.max_mem_slots} not in 1..{MAX_MEM_SLOTS}")


@dataclass
class _Ring:
    num: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0
    log: int = 0
    flags: int = 0
    addr_set: bool = False
    base: int = 0
    kick: int = -1
    call: int = -1
    err: int = -1
    polling: bool = False
    started: bool = False
    enabled: bool = False

    def fds(self):
        return [fd for fd in (self.kick, self.call, self.err) if fd >= 0]


def _pristine(cfg: RingConfig) -> bool:
    return cfg == RingConfig(cfg.index, features=cfg.features)


class NetBackend:
    """One connection's virtio-net back-end state; handlers named after the requests."""

    def __init__(self, config: Optional[BackendConfig] = None, hooks: Optional[DeviceHooks] = None):
        self.config = config if config is not None else BackendConfig()
        self.hooks = hooks if hooks is not None else NullHooks()
        self.nrings = 2 * self.config.max_queue_pairs
        self.acked_protocol_features = 0
        self._closed = False
        self._clear()

    def _clear(self, keep_protocol: bool = False) -> None:
        """Back to the initial state; the caller has dealt with the fds."""
        self.acked_features = 0
        if not keep_protocol:
            self.acked_protocol_features = 0
            self._protocol_seen = False
        self.owner = False
        self.status = 0
        self.mtu: Optional[int] = None    # NET_SET_MTU: the guest's MTU (virtio-net config mtu)
        self.refused: Optional[str] = None   # why the set-up is refused (SetupRefused)
        self.queue_num_asked = False
        self.regions: list[Region] = []
        self._dup_regions: dict = {}     # (gpa, size, uva) -> ADD_MEM_REG repeats not yet removed
        self.backend_req_fd = -1
        self.log: Optional[LogArea] = None   # SET_LOG_BASE
        self.log_call_fd = -1                # SET_LOG_FD
        self.rings = [_Ring() for _ in range(self.nrings)]
        self._published = [self.ring_config(i) for i in range(self.nrings)]
        self._published_status = 0
        self._to_close: list[int] = []

    # -- state the I/O side and the tests read --------------------------------

    @property
    def legacy(self) -> bool:
        """A front-end that never negotiated protocol features (Vapp and older)."""
        return not self._protocol_seen and not self.acked_features & _F_PROTOCOL

    @property
    def only_asked_queue_num(self) -> bool:
        """GET_QUEUE_NUM answered, and no memory table nor ring size, address or
        kick since: a front-end that leaves now wants more queue pairs than
        offered. QEMU 7.2 sends ring 0 and 1's CALL and ERR fds, compares
        GET_QUEUE_NUM with its queues=, says "you are asking more queues than
        supported", closes, and connects again at once."""
        return self.queue_num_asked and not self.regions and not any(
            r.num or r.addr_set or r.started for r in self.rings)

    def admit(self, row) -> None:
        """Before each handler (dispatch.Device.admit): a refused set-up stays
        refused; requests that only ask (they always reply) are still answered."""
        if self.refused is not None and not row.reply and row.handler != "reset_owner":
            raise SetupRefused(self.refused, quiet=True)

    def owned_fds(self) -> set:
        """Every fd the device holds (tests check these are closed after close())."""
        fds = {r.fd for r in self.regions} | set(self._to_close)
        for r in self.rings:
            fds.update(r.fds())
        if self.backend_req_fd >= 0:
            fds.add(self.backend_req_fd)
        if self.log is not None:
            fds.add(self.log.fd)
        if self.log_call_fd >= 0:
            fds.add(self.log_call_fd)
        return fds

    def ring_config(self, index: int) -> RingConfig:
        r = self.rings[index]
        mapped = r.addr_set and r.num > 0 and all(
            self._uva_mapped(addr, length) for _, addr, length in
            ring_parts(r.desc, r.avail, r.used, r.num, self._packed))
        return RingConfig(index, r.num, r.desc, r.avail, r.used, r.log, r.flags, r.base,
                          r.kick, r.call, r.err, r.polling, r.started, r.enabled, mapped,
                          self.acked_features)

    def perform(self, effect):
        """Carry out an effect with the (synchronous) hooks: see the module docstring."""
        if isinstance(effect, StopRing):
            return self.hooks.ring_stop(effect.index)
        raise TypeError(f"unknown effect {effect!r}")

    def after_message(self) -> None:
        """Recompute each ring's config; tell the hooks what changed; close replaced fds."""
        try:
            for i in range(self.nrings):
                cfg, last = self.ring_config(i), self._published[i]
                if cfg == last:
                    continue
                self._published[i] = cfg
                if _pristine(cfg) and _pristine(last):
                    continue          # only the features moved, on a ring nobody set up
                log.debug("ring %d: %s", i, cfg)
                self.hooks.ring_changed(i, cfg)
            if self.status != self._published_status:
                self._published_status = self.status
                self.hooks.status_changed(self.status)
        finally:
            fds, self._to_close = self._to_close, []
            close_fds(fds)

    def close(self) -> None:
        """The connection is gone: tell the hooks, close every fd. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._reset(keep_protocol=False)

    def _reset(self, keep_protocol: bool) -> None:
        fds = self.owned_fds()
        try:
            self.hooks.reset()
        finally:
            self._clear(keep_protocol)
            close_fds(sorted(fds))

    # -- helpers ------------------------------------------------------------

    def _ring(self, index: int) -> _Ring:
        if not 0 <= index < self.nrings:
            qp = self.config.max_queue_pairs
            self.refused = (f"ring index {index} out of range (0..{self.nrings - 1}): queue pair "
                            f"{queue_pair(index)} asked for, {qp} offered (vhu.master --queues); the "
                            f"front-end's set-up is refused: give it at most {qp} queue "
                            f"pair{'s' if qp > 1 else ''}, or offer more")
            raise SetupRefused(self.refused)
        return self.rings[index]

    def _uva_mapped(self, addr: int, length: int) -> bool:
        return any(r.contains_uva(addr, length) for r in self.regions)

    def _install_table(self, regions: list) -> None:
        """Let the hooks map the new table (or refuse it), then commit it."""
        try:
            self.hooks.memory_table_changed(regions)
        except (ValueError, OSError) as e:
            raise ProtocolError(f"memory table refused: {e}") from None
        old = {r.fd for r in self.regions} - {r.fd for r in regions}
        self.regions = regions
        self._to_close += sorted(old)
        log.info("memory table: %s", ", ".join(
            f"gpa {r.guest_phys_addr:#x}+{r.memory_size:#x} uva {r.userspace_addr:#x} "
            f"off {r.mmap_offset:#x}" for r in regions) or "empty")

    def _vring_fd(self, msg: Message, f: VringFile) -> int:
        """The fd of SET_VRING_KICK/CALL/ERR, taken; -1 with the no-fd flag.
        Anything but an eventfd is refused before the ring changes."""
        if f.nofd:
            if msg.fds:
                raise ProtocolError("no-fd flag set but an fd is attached")
            return -1
        if len(msg.fds) != 1:
            raise ProtocolError("no fd attached and the no-fd flag is not set")
        try:
            self.hooks.check_eventfd(msg.fds[0])
        except (ValueError, OSError) as e:
            raise ProtocolError(f"{msg.name} ring {f.index}: {e}") from None
        return msg.take_fds()[0]

    def _replace(self, old: int, new: int) -> int:
        if old >= 0 and old != new:
            self._to_close.append(old)
        return new

    # -- features and ownership -----------------------------------------------

    def get_features(self, msg: Message) -> bytes:
        return U64(self.config.features).pack()

    def set_features(self, msg: Message) -> None:
        features = U64.unpack(msg.payload).value
        extra = features & ~self.config.features
        if extra:
            raise ProtocolError(f"feature bits {extra:#x} were not offered")
        if (features ^ self.acked_features) & ~F_LOG_ALL and any(r.started for r in self.rings):
            # LOG_ALL alone may flip on running rings ("Migration"); the
            # workers switch logging between two batches.
            raise ProtocolError("features changed while rings are started")
        if not features & _F_PACKED:
            # A ring size set while RING_PACKED was on (any size) must still
            # be one a split ring can have.
            for i, r in enumerate(self.rings):
                if r.num & (r.num - 1):
                    raise ProtocolError(f"ring {i}: size {r.num} is not a power of two, "
                                        f"needed without RING_PACKED")
        if (features ^ self.acked_features) == F_LOG_ALL:
            # A migration starts or ends: said at INFO (the full line is for set-up).
            self.acked_features = features
            log.info("dirty-page logging %s", "on" if features & F_LOG_ALL else "off")
            return
        self.acked_features = features
        log.info("virtio features %#x (net header %d bytes; protocol features %#x)", features,
                 vnet_header_size(features), self.acked_protocol_features)
        if not features & _F_PROTOCOL:
            # "Ring states": without PROTOCOL_FEATURES the back-end must enable all rings.
            for r in self.rings:
                r.enabled = True

    def _check_protocol_offered(self) -> None:
        if not self.config.features & _F_PROTOCOL:
            raise ProtocolError("PROTOCOL_FEATURES was not offered")

    def get_protocol_features(self, msg: Message) -> bytes:
        self._check_protocol_offered()
        self._protocol_seen = True
        return U64(self.config.protocol_features).pack()

    def set_protocol_features(self, msg: Message) -> None:
        self._check_protocol_offered()
        features = U64.unpack(msg.payload).value
        extra = features & ~self.config.protocol_features
        if extra:
            raise ProtocolError(f"protocol feature bits {extra:#x} were not offered")
        self._protocol_seen = True
        self.acked_protocol_features = features
        # DEBUG: a front-end that leaves right after it (QEMU wanting more queue
        # pairs) would otherwise log this line at each of its retries; SET_FEATURES
        # logs both at INFO once the front-end goes on.
        log.debug("protocol features %#x", features)

    def set_owner(self, msg: Message) -> None:
        if self.owner:
            log.debug("SET_OWNER again")
        self.owner = True

    def reset_owner(self, msg: Message) -> None:
        """Deprecated by the spec; here: stop everything, close every fd, forget the
        features and the tables (the negotiated protocol features stay)."""
        self._reset(keep_protocol=True)

    def get_queue_num(self, msg: Message) -> bytes:
        self.queue_num_asked = True
        return U64(self.config.max_queue_pairs).pack()

    def set_backend_req_fd(self, msg: Message) -> None:
        self.backend_req_fd = self._replace(self.backend_req_fd, msg.take_fds()[0])

    def set_status(self, msg: Message) -> None:
        status = U64.unpack(msg.payload).value
        if status > 0xFF:
            raise ProtocolError(f"device status {status:#x} is not a byte")
        self.status = status

    def get_status(self, msg: Message) -> bytes:
        return U64(self.status).pack()

    def send_rarp(self, msg: Message) -> None:
        """The guest's MAC in the payload's first 6 bytes ("Back-end message
        types": VHOST_USER_SEND_RARP); the I/O side broadcasts the RARP."""
        mac = U64.unpack(msg.payload).value.to_bytes(8, "little")[:6]
        if mac[0] & 1 or mac == bytes(6):
            raise ProtocolError(f"SEND_RARP: {mac.hex(':')} is not a station address")
        log.info("announcing %s (RARP)", mac.hex(":"))
        self.hooks.send_rarp(mac)

    # -- migration: the dirty log ("Migration") -------------------------------

    def set_log_base(self, msg: Message) -> bytes:
        """Map the log the workers mark dirty pages in; replaces (and closes)
        an earlier one. Always answered (QEMU waits for this reply even
        without REPLY_ACK): a u64 0, as DPDK and libvhost-user answer."""
        d = LogDescription.unpack(msg.payload)
        if len(msg.fds) != 1:
            raise ProtocolError("SET_LOG_BASE without its log fd (LOG_SHMFD)")
        try:
            region_rules.check_log_area(d.mmap_size, d.mmap_offset)
        except region_rules.RegionTableError as e:
            raise ProtocolError(str(e)) from None
        area = LogArea(msg.fds[0], d.mmap_size, d.mmap_offset)
        try:
            self.hooks.log_changed(area)
        except (ValueError, OSError) as e:
            raise ProtocolError(f"log refused: {e}") from None
        msg.take_fds()
        if self.log is not None:
            self._to_close.append(self.log.fd)
        self.log = area
        log.info("dirty log: %#x bytes at offset %#x (guest memory up to %#x)",
                 d.mmap_size, d.mmap_offset, d.mmap_size * 8 * 4096)
        return U64(0).pack()

    def set_log_fd(self, msg: Message) -> None:
        """An eventfd for "the log was modified" notices ("Migration": optional;
        QEMU and DPDK never send it, they read the log when they sync). The
        workers signal it after a round that marked pages; kept, and closed
        with the connection or when replaced."""
        try:
            self.hooks.check_eventfd(msg.fds[0])
        except (ValueError, OSError) as e:
            raise ProtocolError(f"SET_LOG_FD: {e}") from None
        self.log_call_fd = self._replace(self.log_call_fd, msg.take_fds()[0])
        self.hooks.log_call_changed(self.log_call_fd)

    def net_set_mtu(self, msg: Message) -> None:
        """The MTU the front-end gives the guest (QEMU host_mtu=): kept and
        logged. Frames are not cut to it: the guest's own stack keeps to it,
        and a larger frame is still bounded by the guest's buffers."""
        mtu = U64.unpack(msg.payload).value
        if not MTU_MIN <= mtu <= MTU_MAX:
            raise ProtocolError(f"MTU {mtu} is outside {MTU_MIN}..{MTU_MAX}")
        self.mtu = mtu
        log.info("MTU %d", mtu)

    # -- memory ---------------------------------------------------------------

    def set_mem_table(self, msg: Message) -> None:
        table = MemoryTable.unpack(msg.payload)
        if len(msg.fds) != len(table.regions):
            raise ProtocolError(f"{len(table.regions)} regions but {len(msg.fds)} fds")
        specs = [(r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
                 for r in table.regions]
        validate_regions(specs, VHOST_MEMORY_BASELINE_NREGIONS)
        self._install_table([Region(fd, *s) for fd, s in zip(msg.fds, specs)])
        self._dup_regions = {}
        msg.take_fds()

    def get_max_mem_slots(self, msg: Message) -> bytes:
        return U64(self.config.max_mem_slots).pack()

    def add_mem_reg(self, msg: Message) -> None:
        r = SingleMemoryRegion.unpack(msg.payload).region
        spec = (r.guest_phys_addr, r.memory_size, r.userspace_addr, r.mmap_offset)
        if any(tuple(x[1:]) == spec for x in self.regions):
            # QEMU before 8.0 has one vhost device per queue pair on this one
            # connection and each sends the whole table: ADD_MEM_REG (and later
            # REM_MEM_REG) once per queue pair. The same region again is counted,
            # not mapped twice; its fd is closed unused (we never take it).
            self._dup_regions[spec[:3]] = self._dup_regions.get(spec[:3], 0) + 1
            return
        validate_regions([x[1:] for x in self.regions] + [spec], self.config.max_mem_slots)
        self._install_table(self.regions + [Region(msg.fds[0], *spec)])
        msg.take_fds()

    def rem_mem_reg(self, msg: Message) -> None:
        """The region with this gpa, size and user address goes (mmap offset ignored).
        An fd sent along is closed unused (by the dispatcher: we never take it)."""
        r = SingleMemoryRegion.unpack(msg.payload).region
        key = (r.guest_phys_addr, r.memory_size, r.userspace_addr)
        if self._dup_regions.get(key):   # a repeated ADD_MEM_REG's removal: still mapped
            self._dup_regions[key] -= 1
            return
        keep = [x for x in self.regions
                if (x.guest_phys_addr, x.memory_size, x.userspace_addr) != key]
        if len(keep) == len(self.regions):
            raise ProtocolError(f"no region gpa {key[0]:#x} size {key[1]:#x} uva {key[2]:#x}")
        self._install_table(keep)

    # -- rings ----------------------------------------------------------------

    @property
    def _packed(self) -> bool:
        return bool(self.acked_features & _F_PACKED)

    def set_vring_num(self, msg: Message) -> None:
        s = VringState.unpack(msg.payload)
        r = self._ring(s.index)
        if r.started:
            raise ProtocolError(f"ring {s.index} is started")
        # Split rings need a power of two (2.7); packed rings any size (2.8).
        if not 1 <= s.num <= VIRTQUEUE_MAX_SIZE or (s.num & (s.num - 1) and not self._packed):
            raise ProtocolError(f"ring size {s.num} is not {'' if self._packed else 'a power of two '}"
                                f"in 1..{VIRTQUEUE_MAX_SIZE}")
        r.num = s.num

    def set_vring_addr(self, msg: Message) -> None:
        a = VringAddr.unpack(msg.payload)
        r = self._ring(a.index)
        if a.flags & ~VRING_F_LOG:
            raise ProtocolError(f"ring {a.index}: address flags {a.flags:#x} not supported "
                                f"(only VHOST_VRING_F_LOG)")
        packed = self._packed
        try:
            out_of_spec = check_alignment(a.desc_user_addr, a.avail_user_addr,
                                          a.used_user_addr, packed)
        except MisalignedRing as e:
            raise ProtocolError(f"ring {a.index}: {e}") from None
        for name, addr, length in ring_parts(a.desc_user_addr, a.avail_user_addr,
                                             a.used_user_addr, r.num, packed):
            if not self._uva_mapped(addr, length):
                raise ProtocolError(f"ring {a.index}: {name} [{addr:#x}, +{length:#x}) is not "
                                    f"inside one memory region")
        if out_of_spec:
            # Accepted, as Linux vhost and DPDK accept it (vhu.ring_layout); said once per ring.
            log.info("ring %d: out-of-spec layout, served anyway: %s", a.index,
                     "; ".join(out_of_spec))
        r.desc, r.avail, r.used = a.desc_user_addr, a.avail_user_addr, a.used_user_addr
        r.log, r.flags, r.addr_set = a.log_guest_addr, a.flags, True

    def set_vring_base(self, msg: Message) -> None:
        s = VringState.unpack(msg.payload)
        r = self._ring(s.index)
        if r.started:
            raise ProtocolError(f"ring {s.index} is started")
        if self._packed:
            # "Vring descriptor indices for packed virtqueues": bits 0-14 next avail
            # position, 15 its wrap counter; 16-30 next used position, 31 its wrap
            # counter (QEMU sends both, DPDK only the low half).
            avail, used = s.num & 0xFFFF, s.num >> 16
            for what, v in (("avail", avail), ("used", used)):
                if r.num and v & 0x7FFF >= r.num:
                    raise ProtocolError(f"ring {s.index}: packed {what} position {v & 0x7FFF} "
                                        f">= ring size {r.num}")
            if used and used != avail:
                # Buffers in flight at a restart: we complete every chain we pop
                # before a stop, so this only comes from an earlier back-end that
                # did not; resuming from avail is what DPDK does too.
                log.warning("ring %d: packed used index %#x differs from avail %#x; "
                            "resuming both at avail", s.index, used, avail)
            r.base = avail
        else:
            if s.num > 0xFFFF:
                # Split rings: bits 16-31 are reserved.
                raise ProtocolError(f"ring {s.index}: base {s.num:#x} has reserved bits set")
            r.base = s.num

    def get_vring_base(self, msg: Message):
        """Stop the ring ("Ring states") and reply its next avail index (a
        generator: the I/O side answers the StopRing effect)."""
        s = VringState.unpack(msg.payload)      # s.num is reserved; ignored
        r = self._ring(s.index)
        if r.started:
            base = yield StopRing(s.index)
            if base is not None:
                if not 0 <= base <= 0xFFFF:
                    log.error("ring %d: ring_stop returned %r; masked to 16 bits", s.index, base)
                r.base = int(base) & 0xFFFF
            r.started = False
            r.kick, r.polling = self._replace(r.kick, -1), False
            log.info("ring %d stopped at avail index %d", s.index, r.base)
        if self._packed:
            # Every popped chain is used before a ring stops: the used position and
            # wrap counter equal the avail ones (bits 16-31, which QEMU restores).
            return VringState(s.index, r.base | r.base << 16).pack()
        return VringState(s.index, r.base).pack()

    def set_vring_kick(self, msg: Message) -> None:
        """Start the ring (its kick fd, or polling with the no-fd flag)."""
        f = VringFile.unpack(msg.payload)
        r = self._ring(f.index)
        fd = self._vring_fd(msg, f)
        r.kick, r.polling = self._replace(r.kick, fd), f.nofd
        if self.legacy:
            r.enabled = True          # legacy front-ends never send SET_VRING_ENABLE
        if not r.started:
            log.info("ring %d started (%s)", f.index, "polling" if f.nofd else f"kick fd {fd}")
        r.started = True

    def set_vring_call(self, msg: Message) -> None:
        f = VringFile.unpack(msg.payload)
        r = self._ring(f.index)
        r.call = self._replace(r.call, self._vring_fd(msg, f))

    def set_vring_err(self, msg: Message) -> None:
        f = VringFile.unpack(msg.payload)
        r = self._ring(f.index)
        r.err = self._replace(r.err, self._vring_fd(msg, f))

    def set_vring_enable(self, msg: Message) -> None:
        self._check_protocol_offered()
        s = VringState.unpack(msg.payload)
        r = self._ring(s.index)
        if s.num not in (0, 1):
            raise ProtocolError(f"ring {s.index}: enable value {s.num} is not 0 or 1")
        r.enabled = bool(s.num)
