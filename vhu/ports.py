"""One vhost-user port: its socket (server or client mode), the connection to
the current front-end, and the glue from protocol state transitions to worker
commands. Everything here runs in the master's event loop.
"""
import errno
import logging
import os
import select
import selectors
import socket
import stat
import time

from vhu._mem import GuestMemory
from vhu.protocol.backend import BackendConfig, NetBackend
from vhu.protocol.dispatch import Dispatcher
from vhu.protocol.messages import MAX_PAYLOAD_SIZE
from vhu.protocol.wire import close_fds
from vhu.workers.process import RingSetup, WorkerError

log = logging.getLogger("vhu.master.port")

HEADER_SIZE = 12
RECV_FDS = 16
MESSAGE_TIMEOUT = 2.0
RECONNECT_MIN, RECONNECT_MAX = 0.05, 2.0
# What a running ring is started with; any change of these restarts it
# (stopped first, so it restarts from the worker's real last_avail_idx).
_RESTART_FIELDS = ("num", "desc_addr", "avail_addr", "used_addr", "features")


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request a migrated guest's back-end sends for it
    (RFC 903; as QEMU's and DPDK's announcements): 60 bytes."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"
    rarp = (b"\x00\x01\x08\x00\x06\x04\x00\x03"    # Ethernet, IPv4, 6, 4, reverse request
            + mac + bytes(4) + mac + bytes(4))
    return (eth + rarp).ljust(60, b"\0")


class WorkerHooks:
    """The protocol layer's state transitions (vhu.protocol.backend.DeviceHooks),
    turned into commands for the workers that own the rings."""

    def __init__(self, port):
        self.port = port
        self.master = port.master
        self.running = {}          # ring index -> RingConfig the worker runs it with

    def _worker(self, index):
        return self.master.worker_for_ring(index)

    def memory_table_changed(self, regions):
        # Map it here first: an fd that cannot be mapped refuses the message
        # before any worker has switched tables.
        probe = GuestMemory()
        probe.set_table([tuple(r) for r in regions])
        probe.clear()
        specs = [tuple(r)[1:] for r in regions]
        for w in self.master.workers:
            w.call("mem", self.port.index, specs, fds=[os.dup(r.fd) for r in regions])

    def ring_changed(self, index, cfg):
        if cfg.ready and cfg.enabled:     # the stats list these (vhu.stats.port_stats)
            self.port.queue_pairs_in_use = max(self.port.queue_pairs_in_use, index // 2 + 1)
        was = self.running.get(index)
        if not cfg.ready:
            if was is not None:
                self.ring_stop(index)
            return
        if was is not None and any(getattr(cfg, f) != getattr(was, f) for f in _RESTART_FIELDS):
            base = self.ring_stop(index)
            self._start(index, cfg, base)
            return
        if was is None:
            self._start(index, cfg, cfg.base)
            return
        w, port = self._worker(index), self.port.index
        if cfg.enabled != was.enabled:
            w.call("ring_enable", port, index, cfg.enabled)
        if cfg.kick_fd != was.kick_fd or cfg.polling != was.polling:
            w.call("ring_kick", port, index, fds=self._fd_or_private(cfg.kick_fd))
        if cfg.call_fd != was.call_fd:
            w.call("ring_call", port, index, fds=self._fd_or_private(cfg.call_fd))
        self.running[index] = cfg

    @staticmethod
    def _fd_or_private(fd):
        # A ring without a kick fd is polled (and one without call fd never
        # signals): an eventfd nobody else holds keeps the worker uniform.
        return [os.dup(fd) if fd >= 0 else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)]

    def _start(self, index, cfg, base):
        setup = RingSetup(size=cfg.num, desc=cfg.desc_addr, avail=cfg.avail_addr,
                          used=cfg.used_addr, base=base, features=cfg.features,
                          event_idx=cfg.event_idx, indirect=cfg.indirect, enabled=cfg.enabled,
                          polled=cfg.kick_fd < 0, packed=cfg.packed)
        fds = self._fd_or_private(cfg.kick_fd) + self._fd_or_private(cfg.call_fd)
        self._worker(index).call("ring_start", self.port.index, index, setup, fds=fds)
        self.running[index] = cfg

    def ring_stop(self, index):
        """The worker's real last_avail_idx, or None if no worker ran the ring."""
        if self.running.pop(index, None) is None:
            return None
        return self._worker(index).call("ring_stop", self.port.index, index)

    def status_changed(self, status):
        log.info("port %d: device status %#x", self.port.index, status)

    def send_rarp(self, mac):
        # Queue pair 0's worker sends it on as a frame from this port's guest.
        if not self._worker(0).call("port_inject", self.port.index, rarp_frame(mac)):
            log.warning("port %d: RARP for %s not sent: queue pair 0 is not running",
                        self.port.index, mac.hex(":"))

    def reset(self):
        self.running.clear()
        for w in self.master.workers:
            w.call("port_reset", self.port.index)


class Port:
    def __init__(self, master, index, path):
        self.master = master
        self.config = master.config
        self.index = index
        self.path = path
        # client mode: for every port (--client) or for some (Forwarder ports)
        self.client = self.config.client or index in getattr(self.config, "client_ports", ())
        self.listener = None
        self.conn = None
        self.session = None
        self.created_inode = None
        self.next_connect = None
        self.backoff = RECONNECT_MIN
        self._rx = bytearray()            # the message being read, and its fds
        self._rx_fds = []
        self._rx_deadline = None
        self._tx = bytearray()            # replies not sent yet
        self._tx_deadline = None
        self._events = 0
        self.queue_pairs_in_use = 0       # the most a front-end has started and enabled here
        # Front-ends in a row that left right after GET_QUEUE_NUM: QEMU with more
        # queues= than offered does so and reconnects at once, forever. Said
        # once; each next one is accepted (or connected to) a little later.
        self._queue_num_leavers = 0
        self._accept_at = None            # listener paused until then

    @property
    def connected(self):
        return self.conn is not None

    # -- sockets ------------------------------------------------------------

    def open(self):
        if self.client:
            self.next_connect = time.monotonic()
        else:
            self._listen()

    def _listen(self):
        path = self.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)           # stale: left by a vhu that was killed
                log.info("%s: removed a stale socket file", path)
            else:
                raise OSError(errno.EADDRINUSE, f"{path}: a live back-end is listening there")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777)             # no window where the socket is wider than asked
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, self.config.socket_mode)
        self.created_inode = os.lstat(path).st_ino
        s.listen(4)
        s.setblocking(False)
        self.listener = s
        self.master.selector.register(s, selectors.EVENT_READ, self._on_accept)
        log.info("port %d: listening on %s", self.index, path)

    def _on_accept(self, events):
        if self.conn is not None and self._drain():
            # The current front-end still has messages (and maybe its EOF) to
            # handle: leave the newcomer in the backlog until they are done.
            return
        if self._accept_at is not None:
            return                        # its EOF paused accepting (_note_queue_num_leaver)
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        if self.conn is not None:
            log.warning("port %d: %s already has a front-end; refusing another", self.index, self.path)
            conn.close()
            return
        self._attach(conn)

    def _drain(self, limit=64):
        """Handle what the current front-end has already sent (at most `limit`
        messages); True if it still has more. A restarted front-end may connect
        before the event loop has seen its predecessor's EOF: that EOF is read
        here first, so the newcomer is served, not refused."""
        for _ in range(limit):
            if self.conn is not None and self._tx:
                self._flush()
                if self.conn is not None and self._tx:
                    return True       # it is not reading its replies yet
                continue
            if self.conn is None or not select.select([self.conn], [], [], 0)[0]:
                return False
            self._on_readable(selectors.EVENT_READ)
        return self.conn is not None

    def timer_due(self):
        due = 3600.0 if self.next_connect is None else self.next_connect - time.monotonic()
        for deadline in (self._rx_deadline, self._tx_deadline, self._accept_at):
            if deadline is not None:
                due = min(due, deadline - time.monotonic())
        return max(0.0, due)

    def on_timer(self, now):
        if self._rx_deadline is not None and now >= self._rx_deadline:
            self._detach(f"message incomplete after {MESSAGE_TIMEOUT:g} s")
        if self._tx_deadline is not None and now >= self._tx_deadline:
            self._detach(f"replies not read for {MESSAGE_TIMEOUT:g} s")
        if self._accept_at is not None and now >= self._accept_at and self.listener is not None:
            self._accept_at = None
            self.master.selector.register(self.listener, selectors.EVENT_READ, self._on_accept)
        if self.next_connect is None or now < self.next_connect or self.conn is not None:
            return
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            self.next_connect = now + self.backoff
            if self.backoff == RECONNECT_MIN:
                log.info("port %d: waiting for a front-end at %s (%s)", self.index, self.path,
                         exc.strerror)
            self.backoff = min(self.backoff * 2, RECONNECT_MAX)
            return
        self.next_connect = None
        self.backoff = RECONNECT_MIN
        self._attach(s)

    def _attach(self, conn):
        conn.setblocking(False)
        self.conn = conn
        device = NetBackend(BackendConfig(max_queue_pairs=self.config.queues), WorkerHooks(self))
        self.session = Dispatcher(device)
        self.master.selector.register(conn, selectors.EVENT_READ, self._on_readable)
        self._events = selectors.EVENT_READ
        log.log(logging.DEBUG if self._queue_num_leavers else logging.INFO,
                "port %d: front-end connected on %s", self.index, self.path)

    def _read_message(self):
        """One whole message and its fds, read without blocking the event loop.

        The 12-byte header comes first with recvmsg (the fds ride on a
        message's first bytes), then exactly its payload. Reading message by
        message, as QEMU and DPDK do, keeps fds with their message: a larger
        read could join earlier messages to the one carrying fds. What has
        arrived of a message is kept across calls (BlockingIOError until it is
        whole), so a peer that sends half a message stalls only itself; the
        timer closes its connection after MESSAGE_TIMEOUT. Returns (None, [])
        at a clean EOF."""
        buf = self._rx
        while True:
            need = HEADER_SIZE - len(buf)
            if need <= 0:
                size = int.from_bytes(buf[8:12], "little")
                # Larger than the cap: the dispatcher refuses the header alone.
                need = HEADER_SIZE + (size if size <= MAX_PAYLOAD_SIZE else 0) - len(buf)
            if need <= 0:
                fds, self._rx_fds = self._rx_fds, []
                data = bytes(buf)
                buf.clear()
                self._rx_deadline = None
                return data, fds
            data, fds, flags, _ = socket.recv_fds(self.conn, need, RECV_FDS)
            self._rx_fds += fds
            if flags & socket.MSG_CTRUNC:
                raise ConnectionError("too many fds in one message (control data truncated)")
            if not data:
                if buf:
                    raise ConnectionError("front-end closed the connection mid-message")
                return None, []
            if not buf:
                self._rx_deadline = time.monotonic() + MESSAGE_TIMEOUT
            buf += data

    def _drop_partial(self):
        close_fds(self._rx_fds)
        self._rx_fds = []
        self._rx.clear()
        self._rx_deadline = None

    def _on_readable(self, events):
        if self._tx:                      # writable again: queued replies first
            self._flush()
            return
        try:
            data, fds = self._read_message()
        except BlockingIOError:
            return
        except (OSError, ConnectionError) as exc:
            self._detach(f"receive failed: {exc}")
            return
        if data is None:
            self._detach("front-end closed the connection")
            return
        try:
            outcome = self.session.receive(data, fds)
        except WorkerError as exc:
            self._detach(f"worker failed: {exc}")
            return
        if outcome.reply:
            self._tx += outcome.reply
            if not self._flush():
                return
        if outcome.close:
            self._detach(outcome.close)

    def _flush(self):
        """Send queued replies without blocking; False if the connection failed.
        While replies are queued the port waits for the socket to be writable
        and reads no further request: a peer that does not read its replies is
        no longer read either (nothing piles up), stalls only itself, and is
        closed after MESSAGE_TIMEOUT."""
        try:
            while self._tx:
                del self._tx[:self.conn.send(self._tx)]
        except BlockingIOError:
            pass
        except OSError as exc:
            self._detach(f"send failed: {exc}")
            return False
        events = selectors.EVENT_WRITE if self._tx else selectors.EVENT_READ
        if events != self._events:
            self.master.selector.modify(self.conn, events, self._on_readable)
            self._events = events
        if not self._tx:
            self._tx_deadline = None
        elif self._tx_deadline is None:
            self._tx_deadline = time.monotonic() + MESSAGE_TIMEOUT
        return True

    def _detach(self, reason):
        if self.conn is None:
            return
        pause = self._note_queue_num_leaver(self.session.device.only_asked_queue_num)
        log.log(logging.DEBUG if self._queue_num_leavers > 1 else logging.INFO,
                "port %d: disconnected: %s", self.index, reason)
        self._drop_partial()
        self._tx.clear()
        self._tx_deadline = None
        self.master.selector.unregister(self.conn)
        self.conn.close()
        self.conn = None
        session, self.session = self.session, None
        try:
            session.close()               # releases every fd it kept; stops rings
        except WorkerError as exc:
            log.error("port %d: reset after disconnect failed: %s", self.index, exc)
        if self.client and not self.master.stopping:
            self.next_connect = time.monotonic() + pause
        elif pause > RECONNECT_MIN and self.listener is not None and self._accept_at is None:
            self.master.selector.unregister(self.listener)
            self._accept_at = time.monotonic() + pause

    def _note_queue_num_leaver(self, left_after_queue_num):
        """Count front-ends leaving right after GET_QUEUE_NUM; the pause before
        the next connection (RECONNECT_MIN, doubling to RECONNECT_MAX while they go on)."""
        if not left_after_queue_num:
            if self._queue_num_leavers > 1:
                log.info("port %d: %d front-ends in a row had left after GET_QUEUE_NUM",
                         self.index, self._queue_num_leavers)
            self._queue_num_leavers = 0
            return RECONNECT_MIN
        self._queue_num_leavers += 1
        if self._queue_num_leavers == 1:
            log.warning("port %d: the front-end left right after asking how many queue pairs "
                        "this port offers (%d): it wants more (QEMU: \"you are asking more queues "
                        "than supported\"); give vhu.master a larger --queues. Its retries are "
                        "logged at DEBUG and served at most every %g s", self.index,
                        self.config.queues, RECONNECT_MAX)
        return min(RECONNECT_MIN * 2 ** self._queue_num_leavers, RECONNECT_MAX)

    def close(self):
        self._detach("shutting down")
        self.next_connect = None
        if self.listener is not None:
            if self._accept_at is None:
                self.master.selector.unregister(self.listener)
            self._accept_at = None
            self.listener.close()
            self.listener = None
            try:
                if os.lstat(self.path).st_ino == self.created_inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
