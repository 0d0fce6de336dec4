"""Split virtqueues (virtio 1.x section 2.7), device side and driver side.

Compiled core (vhu/_ring.pyx): pure logic over guest memory, no I/O.
Python methods here allocate objects per chain: they are for tests, tools and
control code. The per-packet data path uses the nogil cdef API in _ring.pxd.
"""
from typing import Sequence
from vhu._mem import GuestMemory

MAX_QUEUE_SIZE: int          # 32768
NET_HDR_LEN_LEGACY: int      # 10: struct virtio_net_hdr
NET_HDR_LEN_MRG: int         # 12: with num_buffers (VERSION_1 or MRG_RXBUF)

VIRTQ_DESC_F_NEXT: int       # 1
VIRTQ_DESC_F_WRITE: int      # 2
VIRTQ_DESC_F_INDIRECT: int   # 4
VRING_USED_F_NO_NOTIFY: int  # 1
VRING_AVAIL_F_NO_INTERRUPT: int  # 1

# Reasons a ring is marked broken (DeviceRing.broken_reason); each has a counter in stats.
BROKEN_HEAD_OUT_OF_RANGE: str      # "head index >= queue size"
BROKEN_NEXT_OUT_OF_RANGE: str      # "next index >= queue size"
BROKEN_CHAIN_TOO_LONG: str         # "descriptor chain longer than the queue (loop?)"
BROKEN_INDIRECT_BAD_LEN: str       # "indirect table length not a non-zero multiple of 16"
BROKEN_INDIRECT_NESTED: str        # "indirect descriptor inside an indirect table"
BROKEN_INDIRECT_UNMAPPED: str      # "indirect table outside guest memory"
BROKEN_INDIRECT_NOT_NEGOTIATED: str  # "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
BROKEN_BUFFER_UNMAPPED: str        # "buffer outside guest memory"
BROKEN_AVAIL_IDX_JUMP: str         # "avail idx moved by more than the queue size"
BROKEN_READABLE_AFTER_WRITABLE: str  # "device-readable descriptor after a device-writable one"
BROKEN_RING_UNMAPPED: str          # "ring no longer inside guest memory after a memory table change"
BROKEN_TOO_MANY_SEGMENTS: str      # "chain split into more segments than the device can hold"

COUNTER_NAMES: list[str]   # the stats table: DeviceRing.stats keys, bind_counters layout
DEBUG_BUILD: bool          # built with VHU_DEBUG=1

def net_header_len(features: int) -> int:
    """12 when VIRTIO_F_VERSION_1 (bit 32) or VIRTIO_NET_F_MRG_RXBUF (bit 15) is set, else 10."""

def check_queue_size(size: int) -> None:
    """RingError unless 1 <= size <= 32768 and size is a power of two."""

def split_ring_layout(size: int) -> tuple[int, int, int]:
    """Bytes of (descriptor table, avail ring, used ring), event fields included."""

class RingError(ValueError):
    """A ring that cannot be set up (bad size, unmapped or misaligned ring address)."""

class Chain:
    """One available descriptor chain as the device sees it (zero-copy views)."""
    head: int
    readable: list[memoryview]   # device-readable segments, in chain order
    writable: list[memoryview]   # device-writable segments, in chain order
    read_len: int
    write_len: int

class DeviceRing:
    """Device side of a split virtqueue (what the back-end runs).

    Ring addresses are front-end virtual addresses (addr_space="uva", as
    SET_VRING_ADDR sends them) or guest-physical ("gpa"), aligned as
    vhu.ring_layout.check_alignment requires (descriptors 8, avail 2, used 4;
    RingError otherwise). A guest error marks the ring broken: it stops processing (pop returns nothing), the
    reason is kept in broken_reason and counted in stats.
    """
    size: int
    event_idx: bool
    indirect: bool
    mergeable: bool
    hdr_len: int
    def __init__(self, mem: GuestMemory, size: int, desc_addr: int, avail_addr: int,
                 used_addr: int, *, addr_space: str = "uva", event_idx: bool = False,
                 indirect: bool = True, features: int = 0, packed: bool = False,
                 device_reads: bool = False) -> None:
        """features (virtio feature bits) sets hdr_len and mergeable; event_idx/indirect may be given directly.
        device_reads: a transmit queue, whose buffers the device only reads: the WRITE flags of a
        packed indirect table's entries are not looked at (DPDK's virtio PMD sets one on the header)."""
    def remap(self) -> None:
        """Re-translate the ring addresses after the memory table changed (RingError, and the
        ring marked broken, if they no longer map). Rings also do this by themselves before
        touching memory after a table change."""
    def bind_counters(self, buffer: memoryview | bytearray, offset: int = 0) -> None:
        """Keep the counters (len(COUNTER_NAMES) u64s) in buffer at offset, e.g. shared memory;
        the values already there are counted on from."""
    def set_log(self, log: memoryview | bytearray | None = None, offset: int = 0, size: int = 0,
                *, log_used: bool = False, used_gpa: int = 0) -> None:
        """Dirty-page logging on (a log buffer) or off (None); see vhu/_ring_log.pxi."""
    @property
    def logging(self) -> bool: ...
    def flush_log(self) -> None:
        """Mark the pages collected and not yet published (before the ring stops)."""

    @property
    def last_avail_idx(self) -> int: ...
    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        """SET_VRING_BASE: also resets the shadow used index to it."""
    @property
    def used_idx(self) -> int:
        """The device's next used index (published or not)."""
    @property
    def broken(self) -> bool: ...
    @property
    def broken_reason(self) -> str | None: ...
    @property
    def stats(self) -> dict[str, int]:
        """Counters: popped, pushed, published, notify, notify_suppressed, broken_<reason>..."""
    def avail_count(self) -> int:
        """Chains the driver has made available and the device has not popped."""
    def pop(self, max_chains: int) -> list[Chain]: ...
    def push(self, head: int, written: int) -> None:
        """Add a used element (not visible to the driver until publish)."""
    def publish(self) -> bool:
        """Store used->idx (release) once for all pushes; True if the driver wants a notification."""
    def disable_notifications(self) -> None:
        """Ask the driver not to kick (used->flags NO_NOTIFY, or avail_event left behind with EVENT_IDX)."""
    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if buffers arrived meanwhile (poll again before sleeping)."""
    # virtio-net framing on top of pop/push (the caller still calls publish()).
    def tx_frames(self, max_frames: int) -> list[bytes]:
        """Pop frames the driver sent, header stripped; their chains are pushed with written=0."""
    def rx_frames(self, frames: Sequence[bytes]) -> int:
        """Deliver frames into the driver's receive buffers with a header (num_buffers when mergeable).
        Returns how many were delivered; stops at the first that finds no room."""

class DriverRing:
    """Driver side of a split virtqueue (what a front-end runs), addresses guest-physical.

    Owns the descriptor free list. Initialises the ring memory it is given.
    Alignment as for DeviceRing (vhu.ring_layout).
    """
    size: int
    event_idx: bool
    def __init__(self, mem: GuestMemory, size: int, desc_gpa: int, avail_gpa: int,
                 used_gpa: int, *, event_idx: bool = False, start_idx: int = 0) -> None:
        """start_idx: initial avail and used index (a ring resumed from SET_VRING_BASE)."""
    def remap(self) -> None: ...
    @property
    def free_count(self) -> int: ...
    @property
    def avail_idx(self) -> int: ...
    def add(self, readable: Sequence[tuple[int, int]], writable: Sequence[tuple[int, int]] = (),
            *, indirect_gpa: int | None = None) -> int:
        """Make one chain of (gpa, len) buffers available (not visible until publish).
        With indirect_gpa the chain is written as an indirect table there and takes one slot.
        Returns the head id; RingError when the ring is full."""
    def add_slots(self, base_gpa: int, slot_bytes: int, length: int, *, writable: bool = False,
                  max_chains: int | None = None) -> int:
        """Single-buffer chains over fixed slots (head h: base_gpa + h * slot_bytes)."""
    def publish(self) -> bool:
        """Store avail->idx (release); True if the device wants a kick."""
    def get_used(self, max_items: int = 2**31) -> list[tuple[int, int]]:
        """(head, written length) of chains the device returned; frees their descriptors."""
    def disable_interrupts(self) -> None: ...
    def enable_interrupts(self) -> bool:
        """True if used buffers arrived meanwhile."""


def bench_roundtrip(drv: DriverRing, dev: DeviceRing, buf_gpa: int, pkt_len: int,
                    packets: int, batch: int, slot_bytes: int = 2048) -> int:
    """The core ring path as a benchmark (compiled, no GIL): returns packets moved."""
