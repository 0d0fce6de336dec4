"""The front-end's side of the vhost-user conversation: requests out, replies in.

Spec: vhost-user.rst, "Front-end message types" and "Communication"
(https://qemu-project.gitlab.io/qemu/interop/vhost-user.html).

Encoding and framing are vhu.protocol's (payload structs in ``messages``,
``pack_request`` and ``MessageReader`` in ``wire``); which requests get a
reply comes from the same message table the back-end dispatches with. With
REPLY_ACK negotiated every other request asks for an ack, so a refused
message surfaces at the request that caused it, not later as a dead ring.

Blocking I/O with a timeout: a front-end has nothing else to do while it
waits for its back-end.
"""
import array
import logging
import os
import socket
import stat
import time

from vhu.protocol.messages import (
    FLAG_REPLY, LogDescription, ProtocolFeature as PF, Request as R, U64, VringAddr, VringFile,
    VringState, MemoryTable, MemoryRegion,
)
from vhu.protocol.table import TABLE
from vhu.protocol.wire import FramingError, MessageReader, close_fds, pack_request

log = logging.getLogger(__name__)


class FrontendError(RuntimeError):
    """The back-end refused a request, went away, or answered nonsense."""


def _listen(path: str) -> socket.socket:
    """A listening socket at path; a stale socket file (nobody listening) is replaced."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise FrontendError(f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)
        else:
            raise FrontendError(f"something already listens on {path}")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(path)
        s.listen(1)
    except OSError:
        s.close()
        raise
    return s


class Client:
    """One vhost-user connection, front-end side."""

    def __init__(self, path: str, *, listen: bool = False, timeout: float = 10.0):
        self.path = path
        self.timeout = timeout
        self.reply_ack = False
        self._reader = MessageReader()
        self._listener = None
        self.sock = None
        deadline = time.monotonic() + timeout
        if listen:
            self._listener = _listen(path)
            self._listener.settimeout(timeout)
            try:
                self.sock, _ = self._listener.accept()
            except socket.timeout:
                self.close()
                raise FrontendError(f"no back-end connected to {path} within {timeout:g} s") from None
        else:
            # The back-end may still be starting: retry until the timeout.
            while True:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.connect(path)
                    self.sock = s
                    break
                except (FileNotFoundError, ConnectionRefusedError) as e:
                    s.close()
                    if time.monotonic() >= deadline:
                        raise FrontendError(f"cannot connect to {path}: {e.strerror}") from None
                    time.sleep(0.05)
                except OSError:
                    s.close()
                    raise
        self.sock.settimeout(timeout)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self._reader.close()

    # -- transport -------------------------------------------------------------

    def request(self, code: R, payload: bytes = b"", fds=()) -> bytes:
        """Send one request; return the reply payload (b"" when none is due)."""
        row = TABLE[code]
        ack = self.reply_ack and not row.reply
        msg = pack_request(code, payload, need_reply=ack)
        log.debug("-> %s %s%s", code.name, payload.hex(), f" fds {list(fds)}" if fds else "")
        try:
            if fds:
                self.sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           array.array("i", fds))])
            else:
                self.sock.sendall(msg)
        except OSError as e:
            raise FrontendError(f"{code.name}: back-end gone ({e.strerror or e})") from None
        if not (row.reply or ack):
            return b""
        reply = self._read_reply(code)
        if ack:
            (status,) = U64.STRUCT.unpack(reply) if len(reply) == 8 else (None,)
            if status != 0:
                raise FrontendError(f"{code.name} refused by the back-end (ack {status})")
        return reply

    def _read_reply(self, code: R) -> bytes:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(8 * 4))
            except socket.timeout:
                raise FrontendError(f"{code.name}: no reply within {self.timeout:g} s") from None
            except OSError as e:
                raise FrontendError(f"{code.name}: back-end gone ({e.strerror or e})") from None
            fds = []
            for level, typ, cdata in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(cdata[:len(cdata) - len(cdata) % a.itemsize])
                    fds += list(a)
            if not data:
                close_fds(fds)
                raise FrontendError(f"{code.name}: back-end closed the connection")
            try:
                msgs = self._reader.feed(data, fds)
            except FramingError as e:
                raise FrontendError(f"{code.name}: bad reply: {e}") from None
            for m in msgs:
                m.close_fds()         # no reply we send for carries fds
                if m.request != code or not m.flags & FLAG_REPLY:
                    raise FrontendError(f"{code.name}: unexpected {m.name} (flags {m.flags:#x})")
                return m.payload

    def _u64(self, code: R, value=None) -> int:
        reply = self.request(code, b"" if value is None else U64(value).pack())
        if value is not None:
            return value
        if len(reply) != 8:
            raise FrontendError(f"{code.name}: reply of {len(reply)} bytes, expected 8")
        return U64.STRUCT.unpack(reply)[0]

    # -- the requests, named after the messages ---------------------------------

    def set_owner(self) -> None:
        self.request(R.SET_OWNER)

    def get_features(self) -> int:
        return self._u64(R.GET_FEATURES)

    def set_features(self, features: int) -> None:
        self._u64(R.SET_FEATURES, features)

    def get_protocol_features(self) -> int:
        return self._u64(R.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int) -> None:
        self._u64(R.SET_PROTOCOL_FEATURES, features)
        self.reply_ack = bool(features & (1 << PF.REPLY_ACK))

    def get_queue_num(self) -> int:
        return self._u64(R.GET_QUEUE_NUM)

    def set_mem_table(self, regions, fds) -> None:
        """regions: (guest_phys_addr, memory_size, userspace_addr, mmap_offset) per fd."""
        table = MemoryTable(tuple(MemoryRegion(*r) for r in regions))
        self.request(R.SET_MEM_TABLE, table.pack(), fds)

    def set_vring_num(self, index: int, num: int) -> None:
        self.request(R.SET_VRING_NUM, VringState(index, num).pack())

    def set_vring_base(self, index: int, base: int) -> None:
        self.request(R.SET_VRING_BASE, VringState(index, base).pack())

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0,
                       log_guest_addr: int = 0) -> None:
        self.request(R.SET_VRING_ADDR,
                     VringAddr(index, flags, desc, used, avail, log_guest_addr).pack())

    def set_log_base(self, size: int, offset: int, fd: int) -> None:
        """The dirty log (LOG_SHMFD): always answered, with a u64 (0: taken)."""
        reply = self.request(R.SET_LOG_BASE, LogDescription(size, offset).pack(), [fd])
        if len(reply) == 8 and U64.STRUCT.unpack(reply)[0] != 0:
            raise FrontendError(f"SET_LOG_BASE refused (status {U64.STRUCT.unpack(reply)[0]})")

    def set_log_fd(self, fd: int) -> None:
        """The eventfd the back-end signals when it has marked the log."""
        self.request(R.SET_LOG_FD, b"", [fd])

    def set_vring_call(self, index: int, fd: int) -> None:
        self.request(R.SET_VRING_CALL, VringFile(index, False).pack(), [fd])

    def set_vring_kick(self, index: int, fd: int) -> None:
        self.request(R.SET_VRING_KICK, VringFile(index, False).pack(), [fd])

    def set_vring_enable(self, index: int, enable: bool) -> None:
        self.request(R.SET_VRING_ENABLE, VringState(index, int(enable)).pack())

    def get_vring_base(self, index: int) -> int:
        reply = self.request(R.GET_VRING_BASE, VringState(index, 0).pack())
        if len(reply) != VringState.SIZE:
            raise FrontendError(f"GET_VRING_BASE: reply of {len(reply)} bytes")
        s = VringState.unpack(reply)
        if s.index != index:
            raise FrontendError(f"GET_VRING_BASE: reply for ring {s.index}, asked {index}")
        return s.num
