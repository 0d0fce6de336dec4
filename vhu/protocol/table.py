"""The vhost-user message table, as data: one row per front-end request.

Spec: vhost-user.rst, "Front-end message types" (payloads, which requests
carry fds, which reply) and "Communication" (the lists of replying and
fd-carrying requests)
(https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#front-end-message-types).

The dispatcher checks every column before a handler runs; handlers are
methods of the device named exactly after the message (``set_vring_kick``).
A row whose handler the device lacks is an unsupported request.
"""
from dataclasses import dataclass
from typing import Optional

from .messages import (
    MAX_FDS, LogDescription, MemoryTable, Opaque, ProtocolFeature as P, Request as R,
    SingleMemoryRegion, U64, VringAddr, VringFile, VringState,
)


@dataclass(frozen=True)
class Row:
    request: R
    payload: Optional[type]          # payload class (its size_ok() is the size rule); None: empty
    fds: tuple                       # (min, max) fds the message may carry
    reply: bool                      # the back-end always replies (whatever REPLY_ACK says)
    feature: Optional[P]             # protocol feature that must be negotiated first
    handler: str                     # device method name: the request's name, lower case

    def size_ok(self, size: int) -> bool:
        return size == 0 if self.payload is None else self.payload.size_ok(size)


def _row(request, payload=None, fds=(0, 0), reply=False, feature=None):
    return Row(request, payload, fds, reply, feature, request.name.lower())


TABLE: dict[int, Row] = {row.request: row for row in (
    _row(R.GET_FEATURES, reply=True),
    _row(R.SET_FEATURES, U64),
    _row(R.SET_OWNER),
    _row(R.RESET_OWNER),
    _row(R.SET_MEM_TABLE, MemoryTable, fds=(1, MAX_FDS)),
    _row(R.SET_LOG_BASE, LogDescription, fds=(0, 1), reply=True, feature=P.LOG_SHMFD),
    _row(R.SET_LOG_FD, fds=(1, 1), feature=P.LOG_SHMFD),
    _row(R.SET_VRING_NUM, VringState),
    _row(R.SET_VRING_ADDR, VringAddr),
    _row(R.SET_VRING_BASE, VringState),
    _row(R.GET_VRING_BASE, VringState, reply=True),
    _row(R.SET_VRING_KICK, VringFile, fds=(0, 1)),
    _row(R.SET_VRING_CALL, VringFile, fds=(0, 1)),
    _row(R.SET_VRING_ERR, VringFile, fds=(0, 1)),
    _row(R.GET_PROTOCOL_FEATURES, reply=True),
    _row(R.SET_PROTOCOL_FEATURES, U64),
    _row(R.GET_QUEUE_NUM, reply=True, feature=P.MQ),
    _row(R.SET_VRING_ENABLE, VringState),
    _row(R.SEND_RARP, U64, feature=P.RARP),
    _row(R.NET_SET_MTU, U64, feature=P.MTU),
    _row(R.SET_BACKEND_REQ_FD, fds=(1, 1), feature=P.BACKEND_REQ),
    _row(R.IOTLB_MSG, Opaque, reply=True),                 # needs VIRTIO_F_ACCESS_PLATFORM
    _row(R.SET_VRING_ENDIAN, VringState, feature=P.CROSS_ENDIAN),
    _row(R.GET_CONFIG, Opaque, reply=True, feature=P.CONFIG),
    _row(R.SET_CONFIG, Opaque, feature=P.CONFIG),
    _row(R.CREATE_CRYPTO_SESSION, Opaque, reply=True, feature=P.CRYPTO_SESSION),
    _row(R.CLOSE_CRYPTO_SESSION, U64, feature=P.CRYPTO_SESSION),
    _row(R.POSTCOPY_ADVISE, reply=True, feature=P.PAGEFAULT),
    _row(R.POSTCOPY_LISTEN, feature=P.PAGEFAULT),
    _row(R.POSTCOPY_END, reply=True, feature=P.PAGEFAULT),
    _row(R.GET_INFLIGHT_FD, Opaque, reply=True, feature=P.INFLIGHT_SHMFD),
    _row(R.SET_INFLIGHT_FD, Opaque, fds=(1, 1), feature=P.INFLIGHT_SHMFD),
    _row(R.GPU_SET_SOCKET, fds=(1, 1)),
    _row(R.RESET_DEVICE, feature=P.RESET_DEVICE),
    _row(R.VRING_KICK, VringState, feature=P.INBAND_NOTIFICATIONS),
    _row(R.GET_MAX_MEM_SLOTS, reply=True, feature=P.CONFIGURE_MEM_SLOTS),
    _row(R.ADD_MEM_REG, SingleMemoryRegion, fds=(1, 1), feature=P.CONFIGURE_MEM_SLOTS),
    # REM_MEM_REG: "No file descriptors SHOULD be passed ... the back-end MAY accept
    # messages with one file descriptor ... MUST close it": the handler never takes it.
    _row(R.REM_MEM_REG, SingleMemoryRegion, fds=(0, 1), feature=P.CONFIGURE_MEM_SLOTS),
    _row(R.SET_STATUS, U64, feature=P.STATUS),
    _row(R.GET_STATUS, reply=True, feature=P.STATUS),
    _row(R.GET_SHARED_OBJECT, Opaque, reply=True, feature=P.SHARED_OBJECT),
    _row(R.SET_DEVICE_STATE_FD, Opaque, fds=(1, 1), reply=True, feature=P.DEVICE_STATE),
    _row(R.CHECK_DEVICE_STATE, reply=True, feature=P.DEVICE_STATE),
)}

assert set(TABLE) == set(R), "one row per request"
assert all(0 <= row.fds[0] <= row.fds[1] <= MAX_FDS for row in TABLE.values())
