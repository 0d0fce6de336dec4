"""vhost-user wire vocabulary: request codes, feature bits, header flags, payload structs.

Spec: vhost-user.rst, "Message Specification" (header, payloads), "Protocol
features", "Front-end message types", "Back-end message types"
(https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#message-specification).

All numbers are in the machine's native byte order (the spec says so); the
struct formats use "=" (native order, standard sizes, no padding) and every
size is asserted at import. Each payload is a frozen dataclass whose
``unpack(bytes)`` checks the length and the fields it can check on its own,
raising PayloadError; nothing else in the message is trusted either.
"""
import struct
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

from vhu.ring_layout import MAX_QUEUE_SIZE


class ProtocolError(ValueError):
    """A message that cannot be accepted; the text says why (logged, failure reply)."""
    quiet = False          # True: the reason was logged already; this repeat goes to DEBUG


class PayloadError(ProtocolError):
    """A payload of the wrong size or with a field out of range."""


class Request(IntEnum):
    """Front-end -> back-end request codes ("Front-end message types")."""
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21          # previously SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(IntEnum):
    """Back-end -> front-end request codes, sent on the SET_BACKEND_REQ_FD channel."""
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


class VirtioFeature(IntEnum):
    """Virtio (device and transport) feature bit numbers, as GET/SET_FEATURES carry them."""
    NET_CSUM = 0
    NET_GUEST_CSUM = 1
    NET_CTRL_GUEST_OFFLOADS = 2
    NET_MTU = 3
    NET_MAC = 5
    NET_GUEST_TSO4 = 7
    NET_GUEST_TSO6 = 8
    NET_GUEST_ECN = 9
    NET_GUEST_UFO = 10
    NET_HOST_TSO4 = 11
    NET_HOST_TSO6 = 12
    NET_HOST_ECN = 13
    NET_HOST_UFO = 14
    MRG_RXBUF = 15
    NET_STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23
    NOTIFY_ON_EMPTY = 24
    LOG_ALL = 26                     # VHOST_F_LOG_ALL (migration dirty logging)
    ANY_LAYOUT = 27
    INDIRECT_DESC = 28
    EVENT_IDX = 29
    PROTOCOL_FEATURES = 30           # VHOST_USER_F_PROTOCOL_FEATURES
    VERSION_1 = 32
    ACCESS_PLATFORM = 33             # a.k.a. IOMMU_PLATFORM
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38


class ProtocolFeature(IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers ("Protocol features")."""
    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


def mask(*bits: int) -> int:
    """The feature mask with these bit numbers set."""
    m = 0
    for b in bits:
        m |= 1 << b
    return m


# Header flags ("Header": lower 2 bits version, bit 2 reply, bit 3 need_reply).
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
FLAGS_KNOWN = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

# SET_VRING_KICK/CALL/ERR u64: bits 0-7 ring index, bit 8 "no fd" (poll instead).
VRING_IDX_MASK = 0xFF
VRING_NOFD_MASK = 0x100

VRING_F_LOG = 0x1                    # vhost_vring_addr.flags: log used-ring writes

VHOST_MEMORY_BASELINE_NREGIONS = 8   # regions in SET_MEM_TABLE, and fds per message
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS
MAX_PAYLOAD_SIZE = 4096              # no legitimate request payload comes near this
VIRTQUEUE_MAX_SIZE = MAX_QUEUE_SIZE  # virtio: Queue Size is at most 32768 (vhu.ring_layout)
U64_MAX = (1 << 64) - 1

HEADER = struct.Struct("=III")       # request, flags, size
assert HEADER.size == 12


def _exact(cls, data) -> None:
    if len(data) != cls.SIZE:
        raise PayloadError(f"{cls.__name__} payload is {len(data)} bytes, expected {cls.SIZE}")


class _Fixed:
    """A fixed-size payload: STRUCT fields map one-to-one onto the dataclass fields."""
    STRUCT: ClassVar[struct.Struct]
    SIZE: ClassVar[int]

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return size == cls.SIZE

    @classmethod
    def unpack(cls, data: bytes):
        _exact(cls, data)
        return cls(*cls.STRUCT.unpack(data))

    def pack(self) -> bytes:
        return self.STRUCT.pack(*self.__dict__.values())


@dataclass(frozen=True)
class U64(_Fixed):
    """"A single 64-bit integer"."""
    value: int
    STRUCT: ClassVar = struct.Struct("=Q")
    SIZE: ClassVar = 8


@dataclass(frozen=True)
class VringState(_Fixed):
    """"A vring state description" (also the split ring's "vring descriptor index")."""
    index: int
    num: int
    STRUCT: ClassVar = struct.Struct("=II")
    SIZE: ClassVar = 8


@dataclass(frozen=True)
class VringAddr(_Fixed):
    """"A vring address description": ring addresses are front-end user addresses."""
    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int
    STRUCT: ClassVar = struct.Struct("=IIQQQQ")
    SIZE: ClassVar = 40


@dataclass(frozen=True)
class VringFile(_Fixed):
    """The u64 of SET_VRING_KICK/CALL/ERR: ring index (bits 0-7), no-fd flag (bit 8)."""
    index: int
    nofd: bool
    STRUCT: ClassVar = U64.STRUCT
    SIZE: ClassVar = 8

    @classmethod
    def unpack(cls, data: bytes) -> "VringFile":
        _exact(cls, data)
        (v,) = cls.STRUCT.unpack(data)
        if v & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
            raise PayloadError(f"vring file u64 {v:#x} has reserved bits set")
        return cls(v & VRING_IDX_MASK, bool(v & VRING_NOFD_MASK))

    def pack(self) -> bytes:
        return self.STRUCT.pack(self.index | (VRING_NOFD_MASK if self.nofd else 0))


@dataclass(frozen=True)
class MemoryRegion(_Fixed):
    """"Memory region description"."""
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    STRUCT: ClassVar = struct.Struct("=QQQQ")
    SIZE: ClassVar = 32


@dataclass(frozen=True)
class SingleMemoryRegion(_Fixed):
    """"Single memory region description" (ADD_MEM_REG, REM_MEM_REG): 8 bytes padding + region."""
    region: MemoryRegion
    STRUCT: ClassVar = struct.Struct("=Q")   # the padding, ignored
    SIZE: ClassVar = 8 + MemoryRegion.SIZE

    @classmethod
    def unpack(cls, data: bytes) -> "SingleMemoryRegion":
        _exact(cls, data)
        return cls(MemoryRegion.unpack(bytes(data[8:])))

    def pack(self) -> bytes:
        return self.STRUCT.pack(0) + self.region.pack()


@dataclass(frozen=True)
class MemoryTable:
    """"Multiple memory regions description" (SET_MEM_TABLE): nregions, padding, regions.

    Front-ends send 8 + 32 * nregions bytes; the full C struct (8 + 32 * 8) is
    accepted too, its unused entries ignored. nregions must be 1..8.
    """
    regions: tuple
    HEADER: ClassVar = struct.Struct("=II")
    MAX_REGIONS: ClassVar = VHOST_MEMORY_BASELINE_NREGIONS
    MAX_SIZE: ClassVar = 8 + MemoryRegion.SIZE * VHOST_MEMORY_BASELINE_NREGIONS

    @classmethod
    def size_ok(cls, size: int) -> bool:
        n, rest = divmod(size - cls.HEADER.size, MemoryRegion.SIZE)
        return size >= cls.HEADER.size + MemoryRegion.SIZE and rest == 0 and n <= cls.MAX_REGIONS

    @classmethod
    def unpack(cls, data: bytes) -> "MemoryTable":
        if not cls.size_ok(len(data)):
            raise PayloadError(f"memory table payload of {len(data)} bytes")
        nregions, _padding = cls.HEADER.unpack_from(data)
        if not 1 <= nregions <= cls.MAX_REGIONS:
            raise PayloadError(f"memory table with {nregions} regions (1..{cls.MAX_REGIONS})")
        if len(data) not in (cls.HEADER.size + nregions * MemoryRegion.SIZE, cls.MAX_SIZE):
            raise PayloadError(f"memory table of {nregions} regions in {len(data)} bytes")
        regions = tuple(
            MemoryRegion(*MemoryRegion.STRUCT.unpack_from(data, 8 + i * MemoryRegion.SIZE))
            for i in range(nregions))
        return cls(regions)

    def pack(self) -> bytes:
        return (self.HEADER.pack(len(self.regions), 0)
                + b"".join(r.pack() for r in self.regions))


@dataclass(frozen=True)
class LogDescription(_Fixed):
    """"Log description" (SET_LOG_BASE with LOG_SHMFD)."""
    mmap_size: int
    mmap_offset: int
    STRUCT: ClassVar = struct.Struct("=QQ")
    SIZE: ClassVar = 16


class Opaque:
    """A payload vhu does not parse (requests it does not implement): any size up to the cap."""

    @classmethod
    def size_ok(cls, size: int) -> bool:
        return 0 <= size <= MAX_PAYLOAD_SIZE


assert U64.STRUCT.size == U64.SIZE == 8
assert VringState.STRUCT.size == VringState.SIZE == 8
assert VringAddr.STRUCT.size == VringAddr.SIZE == 40
assert MemoryRegion.STRUCT.size == MemoryRegion.SIZE == 32
assert MemoryTable.HEADER.size == 8 and MemoryTable.MAX_SIZE == 264
assert SingleMemoryRegion.SIZE == 40
assert LogDescription.STRUCT.size == LogDescription.SIZE == 16
