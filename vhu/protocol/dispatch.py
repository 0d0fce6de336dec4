"""The one vhost-user dispatcher: check a message against its table row, run its handler, reply.

Spec: vhost-user.rst, "Communication" (which requests reply, which carry fds)
and "VHOST_USER_PROTOCOL_F_REPLY_ACK"
(https://qemu-project.gitlab.io/qemu/interop/vhost-user.html#vhost-user-protocol-f-reply-ack).

Security model. The front-end is not trusted: it may be buggy or hostile (a
guest-controlled QEMU, a container). Nothing in a received message is assumed
sane: not the header, the size, the flags, the fd count, nor any field of the
payload. Before a handler runs, this module checks the header flags, that the
request is known, the payload size, the number of fds and the protocol
feature the request needs; each handler then validates every field it uses
before it changes any state. A refused message changes nothing. Every fd that
arrives is either taken by the handler that keeps it or closed here, so a
peer cannot make us leak descriptors. A bad message costs the peer its
message (logged, a failure reply if it asked for one); only a broken byte
stream, or a refused request the peer would wait forever for a reply to,
costs it its connection, never anyone else's.

Two ways to drive it: receive() runs a message to its end, and the device
performs any effect a handler yields (synchronous hooks: tests, tools);
steps() is a generator that yields those effects (effects.StopRing) to the
caller and takes their answers back, so an event loop can do the work
without blocking (vhu.ports).
"""
import inspect
import logging
from dataclasses import dataclass
from typing import Optional, Protocol

from .effects import StopRing  # noqa: F401  (re-exported: what steps() yields)
from .messages import (
    FLAG_REPLY, FLAGS_KNOWN, VERSION, VERSION_MASK, ProtocolError, ProtocolFeature, U64,
)
from .table import TABLE
from .wire import FramingError, Message, MessageReader, pack_reply

log = logging.getLogger(__name__)

ACK_OK = 0
ACK_FAILED = 1

# A front-end can repeat a bad message as fast as it likes: its first
# refusals are warnings, the rest of that connection's go to DEBUG (one more
# warning says so), so the log says what went wrong without a flood on demand.
REFUSALS_WARNED = 20


class CloseConnection(Exception):
    """This connection (only) must be closed; ``reason`` says why."""

    @property
    def reason(self) -> str:
        return str(self.args[0]) if self.args else "closed"


class Device(Protocol):
    """What the dispatcher needs from a device (see backend.NetBackend)."""
    acked_protocol_features: int

    def after_message(self) -> None:
        """Called after every message, accepted or not: publish state transitions."""

    def perform(self, effect):
        """Carry out an effect a handler yielded, synchronously; its answer."""

    def close(self) -> None:
        """The connection is gone: release everything (fds included)."""

    def admit(self, row) -> None:
        """Before the handler of a message that passed the table's checks: raise
        ProtocolError to refuse it anyway (a device whose set-up is refused)."""

    # ... and one method per supported request, named as in table.TABLE, taking a
    # Message and returning the reply payload (bytes) for requests that always reply.


@dataclass(frozen=True)
class Outcome:
    """What to do with the socket after receive(): send ``reply``; close if ``close``."""
    reply: bytes = b""
    close: Optional[str] = None      # the reason, when this connection must be closed


class Dispatcher:
    """One connection's reader and dispatcher, in front of its device."""

    def __init__(self, device: Device, reader: Optional[MessageReader] = None):
        self.device = device
        self.reader = reader if reader is not None else MessageReader()
        self.refusals = 0          # messages refused on this connection (quiet ones aside)

    def receive(self, data: bytes, fds=()) -> Outcome:
        """Bytes and fds just read from the socket -> bytes to send back (and
        maybe close); effects are performed by the device."""
        return self._run(self.steps(data, fds))

    def steps(self, data: bytes, fds=()):
        """As receive(), as a generator: yields each effect a handler needs
        done, expects its answer sent back, returns the Outcome."""
        try:
            messages = self.reader.feed(data, fds)
        except FramingError as e:
            log.warning("closing connection: framing error: %s", e)
            return Outcome(b"", str(e))
        out = bytearray()
        for i, msg in enumerate(messages):
            try:
                out += yield from self._dispatch(msg)
            except CloseConnection as e:
                for rest in messages[i + 1:]:
                    rest.close_fds()
                log.warning("closing connection: %s", e.reason)
                return Outcome(bytes(out), e.reason)
        return Outcome(bytes(out))

    def _run(self, gen):
        """Drive a steps()/_dispatch() generator, the device performing its effects."""
        try:
            effect = next(gen)
            while True:
                effect = gen.send(self.device.perform(effect))
        except StopIteration as stop:
            return stop.value

    def close(self) -> None:
        """The connection is gone: drop partial input and everything the device holds."""
        self.reader.close()
        self.device.close()

    def _reply_ack(self) -> bool:
        return bool(self.device.acked_protocol_features & (1 << ProtocolFeature.REPLY_ACK))

    def _check(self, msg: Message, row) -> None:
        if msg.flags & VERSION_MASK != VERSION:
            raise CloseConnection(f"{msg.name}: header version {msg.flags & VERSION_MASK}")
        if msg.flags & FLAG_REPLY:
            raise ProtocolError(f"reply flag set on a request (flags {msg.flags:#x})")
        if msg.flags & ~FLAGS_KNOWN:
            raise ProtocolError(f"reserved header flags set ({msg.flags:#x})")
        if row is None:
            raise ProtocolError("unknown request")
        if not row.size_ok(len(msg.payload)):
            raise ProtocolError(f"payload of {len(msg.payload)} bytes is the wrong size")
        lo, hi = row.fds
        if not lo <= len(msg.fds) <= hi:
            raise ProtocolError(f"{len(msg.fds)} fds attached, expected {lo}..{hi}")
        if row.feature is not None and not self.device.acked_protocol_features & (1 << row.feature):
            raise ProtocolError(f"protocol feature {row.feature.name} not negotiated")

    def dispatch(self, msg: Message) -> bytes:
        """Handle one message; return the bytes to send back (b"" for none).

        Raises CloseConnection when the connection must go. Whatever the
        outcome, the fds the handler did not take are closed on return.
        """
        return self._run(self._dispatch(msg))

    def _dispatch(self, msg: Message):
        row = TABLE.get(msg.request)
        try:
            try:
                self._check(msg, row)
                handler = getattr(self.device, row.handler, None)
                if handler is None:
                    raise ProtocolError("not supported by this back-end")
                self.device.admit(row)
                log.debug("%s flags=%#x size=%d fds=%d", msg.name, msg.flags,
                          len(msg.payload), len(msg.fds))
                result = handler(msg)
                if inspect.isgenerator(result):
                    result = yield from result
                status = ACK_OK
            except ProtocolError as e:
                self._log_refusal(msg, e)
                if row is not None and row.reply:
                    # The peer waits for a reply we cannot give: do not leave it hanging.
                    raise CloseConnection(f"{msg.name}: {e}") from None
                result, status = None, ACK_FAILED
            finally:
                msg.close_fds()
                self.device.after_message()
        except CloseConnection:
            raise
        except Exception as e:         # a bug, or a hook that failed: not the peer's fault alone
            log.exception("%s: internal error", msg.name)
            raise CloseConnection(f"{msg.name}: internal error: {e!r}") from e
        if status == ACK_OK and row.reply:
            return pack_reply(msg.request, result)
        return self._ack(msg, status)

    def _log_refusal(self, msg: Message, e: ProtocolError) -> None:
        if e.quiet:
            log.debug("%s refused: %s", msg.name, e)
            return
        self.refusals += 1
        log.log(logging.WARNING if self.refusals <= REFUSALS_WARNED else logging.DEBUG,
                "%s refused: %s", msg.name, e)
        if self.refusals == REFUSALS_WARNED:
            log.warning("%d messages refused on this connection: its further refusals are "
                        "logged at DEBUG", REFUSALS_WARNED)

    def _ack(self, msg: Message, status: int) -> bytes:
        """REPLY_ACK: a u64 status when the peer asked (NEED_REPLY) and the feature is on."""
        if msg.need_reply and self._reply_ack():
            return pack_reply(msg.request, U64(status).pack())
        if msg.need_reply:
            log.debug("%s: NEED_REPLY without REPLY_ACK negotiated; no reply", msg.name)
        return b""
