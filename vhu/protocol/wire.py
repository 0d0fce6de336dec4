"""vhost-user framing: header + payload + the fds that came with them, sans-I/O.

Spec: vhost-user.rst, "Message Specification" / "Header"
(https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#header).

A message is a 12-byte header (request, flags, size) and ``size`` bytes of
payload; its fds travel as SCM_RIGHTS ancillary data of the same sendmsg().
On a stream socket the kernel hands those fds to the recvmsg() that reads the
message's first byte (and stops reading there), so MessageReader attaches the
fds of a feed() to the first message that starts in that chunk, or, when no
message starts in it, to the message still being assembled.

Framing errors (wrong version, a size over the cap, too many fds) leave the
byte stream unusable: FramingError, and the connection must be closed.
"""
import os
from dataclasses import dataclass, field

from .messages import (
    FLAG_NEED_REPLY, FLAG_REPLY, HEADER, MAX_FDS, MAX_PAYLOAD_SIZE, VERSION, VERSION_MASK,
    Request,
)


class FramingError(Exception):
    """The byte stream cannot be trusted any more: close the connection."""


def close_fds(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def request_name(code: int) -> str:
    try:
        return Request(code).name
    except ValueError:
        return f"request {code}"


@dataclass(eq=False)
class Message:
    """One received message. It owns its fds until a handler takes them (take_fds)."""
    request: int                     # a Request member when the code is known
    flags: int
    payload: bytes
    fds: list = field(default_factory=list)

    @property
    def name(self) -> str:
        return request_name(self.request)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fds(self) -> list:
        """Ownership of the fds passes to the caller."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        close_fds(self.take_fds())


def _code(request: int):
    try:
        return Request(request)
    except ValueError:
        return request


def pack_request(request: int, payload: bytes = b"", *, need_reply: bool = False,
                 flags: int = 0) -> bytes:
    """A front-end request (or a back-end request on the BACKEND_REQ channel)."""
    flags |= VERSION | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(int(request), flags, len(payload)) + bytes(payload)


def pack_reply(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A reply: the request's code, version 1, the REPLY flag."""
    return HEADER.pack(int(request), flags | VERSION | FLAG_REPLY, len(payload)) + bytes(payload)


class MessageReader:
    """Feed bytes and fds as they arrive; get back the messages they complete.

    fds handed to feed() belong to the reader until they leave inside a
    Message; on FramingError and on close() the reader closes those it holds.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD_SIZE):
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pending = []           # fds of the message at the head of _buf (or the next one)
        self._dead = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def needed(self) -> int:
        """Bytes still missing from the message being assembled (its header
        first). A stream reader that reads exactly this much never takes the
        next message's first bytes, and so never its fds, with this one."""
        if len(self._buf) < HEADER.size:
            return HEADER.size - len(self._buf)
        _, _, size = HEADER.unpack_from(self._buf, 0)
        return max(HEADER.size + min(size, self.max_payload) - len(self._buf), 0)

    def close(self) -> None:
        close_fds(self._pending)
        self._pending = []
        self._buf.clear()

    def _fail(self, reason: str, *more_fds) -> FramingError:
        for fds in more_fds:
            close_fds(fds)
        self.close()
        self._dead = reason
        return FramingError(reason)

    def feed(self, data: bytes, fds=()) -> list:
        fds = list(fds)
        if self._dead is not None:
            close_fds(fds)
            raise FramingError(f"connection already failed: {self._dead}")
        new_start = len(self._buf)
        self._buf += data
        buf = self._buf
        parsed = []                  # (start, request, flags, payload)
        off = 0
        while len(buf) - off >= HEADER.size:
            request, flags, size = HEADER.unpack_from(buf, off)
            if flags & VERSION_MASK != VERSION:
                raise self._fail(f"{request_name(request)}: header version {flags & VERSION_MASK}, "
                                 f"expected {VERSION} (flags {flags:#x})", fds)
            if size > self.max_payload:
                raise self._fail(f"{request_name(request)}: payload size {size} over the "
                                 f"{self.max_payload}-byte cap", fds)
            end = off + HEADER.size + size
            if len(buf) < end:
                break
            parsed.append((off, request, flags, bytes(buf[off + HEADER.size:end])))
            off = end
        del buf[:off]

        # Attach this chunk's fds (see the module docstring), then the head's.
        assigned = [[] for _ in parsed]
        if parsed:
            assigned[0] = self._pending
            self._pending = []
        if fds:
            target = next((i for i, p in enumerate(parsed) if p[0] >= new_start), None)
            if target is None and parsed and new_start > 0 and not buf:
                target = 0           # the chunk was the tail of the head message
            if target is None:
                self._pending += fds
            else:
                assigned[target] += fds
        for got in assigned + [self._pending]:
            if len(got) > MAX_FDS:
                raise self._fail(f"{len(got)} fds with one message (at most {MAX_FDS})",
                                 *assigned)
        return [Message(_code(r), f, p, a) for (_, r, f, p), a in zip(parsed, assigned)]
