"""One vhost-user port: its socket (server or client mode), the connection to
the current front-end, and the glue from protocol state transitions to worker
commands. Everything here runs in the master's asyncio event loop
(vhu.control), and nothing here blocks it:

* the listener, the connection and client-mode connect(2) are non-blocking
  (a front-end whose backlog is full is retried later, never waited on);
* each connection is one task that reads one message at a time (the framer
  is vhu.protocol.wire's: reading exactly the bytes the current message
  still needs keeps fds with their message), runs it through the sans-I/O
  protocol layer, does the effects it yields (GET_VRING_BASE waits for the
  worker to stop the ring, with the supervisor's deadline) and sends the
  reply; a front-end that sends half a message or stops reading its replies
  is closed after MESSAGE_TIMEOUT: one slow peer is one slow task;
* commands for the workers are queued with the supervisor
  (vhu.workers.supervisor) and not waited for, except before a reply: a
  REPLY_ACK after SET_MEM_TABLE means the workers use the new table.

The port keeps the desired state of its rings (WorkerHooks.running, with
the device's memory table and fds): a replacement worker is given exactly
that (replay()).
"""
import asyncio
import errno
import fcntl
import logging
import mmap
import os
import socket
import stat
import time

from vhu import regions as region_rules
from vhu._mem import GuestMemory
from vhu.netqueues import queue_pair
from vhu.protocol.backend import (F_LOG_ALL, OFFLOAD_FEATURES, SUPPORTED_FEATURES, BackendConfig,
                                  NetBackend)
from vhu.protocol.dispatch import Dispatcher
from vhu.protocol.effects import StopRing
from vhu.protocol.messages import MAX_FDS
from vhu.protocol.wire import close_fds
from vhu.workers.process import RingSetup
from vhu.workers.supervisor import REPLACED, WorkerError

log = logging.getLogger("vhu.master.port")

MESSAGE_TIMEOUT = 2.0
RECONNECT_MIN, RECONNECT_MAX = 0.05, 1.0
QUEUE_NUM_PAUSE_MAX = 2.0    # the most a front-end leaving after GET_QUEUE_NUM waits
# A port whose memory faulted a worker is not served again for a while,
# doubling each time: it cannot put the other ports into a crash loop.
PENALTY_MIN, PENALTY_MAX = 1.0, 60.0
LISTEN_BACKLOG = 4
# What a running ring is started with; any change of these restarts it
# (in the worker, from where it stopped).
_RESTART_FIELDS = ("num", "desc_addr", "avail_addr", "used_addr", "features")
# ... except LOG_ALL, and these, which change in place (ring_log), between two
# batches: a migration starts or ends.
_LOG_FIELDS = ("log_all", "log_used", "log_addr")
_F_SEAL_SHRINK = 0x0002


def rarp_frame(mac: bytes) -> bytes:
    """The broadcast RARP request a migrated guest's back-end sends for it
    (RFC 903; as QEMU's and DPDK's announcements): 60 bytes."""
    eth = b"\xff" * 6 + mac + b"\x80\x35"
    rarp = (b"\x00\x01\x08\x00\x06\x04\x00\x03"    # Ethernet, IPv4, 6, 4, reverse request
            + mac + bytes(4) + mac + bytes(4))
    return (eth + rarp).ljust(60, b"\0")


def _restart_value(cfg, field):
    # LOG_ALL is not a restart: a migration turns it on under running rings.
    v = getattr(cfg, field)
    return v & ~F_LOG_ALL if field == "features" else v


def _map_log(fd, size, offset):
    """An mmap of the log's [offset, offset + size) (offset rounded down to a page)."""
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    return mmap.mmap(fd, size + offset - start, mmap.MAP_SHARED,
                     mmap.PROT_READ | mmap.PROT_WRITE, offset=start)


def is_eventfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


class WorkerHooks:
    """The protocol layer's state transitions (vhu.protocol.backend.DeviceHooks),
    turned into commands for the workers that own the rings."""

    def __init__(self, port):
        self.port = port
        self.control = port.control
        self.index = port.index
        self.running = {}          # ring index -> RingConfig the worker runs it with
        self.epochs = {}           # ring index -> the epoch of its current start (shared rings)
        self.closed = False

    def _worker_of(self, ring):
        """The worker that polls the ring's queue pair (vhu.placement)."""
        return self.control.placement.worker(self.index, queue_pair(ring))

    def _writers(self, ring):
        """Every worker that runs the ring: the owner first (vhu.placement)."""
        return self.control.placement.writers(self.index, ring)

    def _shared(self, ring):
        return self.control.placement.shared(self.index, ring)

    def _submit(self, worker, name, *args, fds=(), key=None, adjacent=False):
        # Attributed to this connection (not just the port index): a late
        # failure must not cut off the next front-end on the same port.
        fut = self.control.pool.submit(worker, name, self.index, *args, fds=fds, key=key,
                                       adjacent=adjacent, port=self)
        self.port.pending.append(fut)
        return fut

    def check_eventfd(self, fd):
        if not is_eventfd(fd):
            try:
                kind = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                kind = "unknown"
            raise ValueError(f"fd is not an eventfd ({kind})")
        os.set_blocking(fd, False)

    def memory_table_changed(self, regions):
        if self.closed:
            return
        # Map it here first: an fd that cannot be mapped refuses the message
        # before any worker has switched tables.
        probe = GuestMemory()
        probe.set_table([tuple(r) for r in regions])
        probe.clear()
        unsealed = [i for i, r in enumerate(regions) if not _shrink_sealed(r.fd)]
        if unsealed and not self.port.told_unsealed:
            self.port.told_unsealed = True
            log.info("port %d: memory region(s) %s not sealed against shrinking "
                     "(F_SEAL_SHRINK): a front-end that truncates them faults a worker, and "
                     "is then cut off", self.index, ", ".join(map(str, unsealed)))
        specs = [tuple(r)[1:] for r in regions]
        for w in range(self.control.pool.count):
            # Tables sent back to back (a front-end that sends nothing else
            # in between) are worth only the last one.
            self._submit(w, "mem", specs, fds=[os.dup(r.fd) for r in regions],
                         key=("mem", self.index), adjacent=True)

    def ring_changed(self, index, cfg):
        if self.closed:
            return
        if cfg.ready and cfg.enabled:     # the stats list these (vhu.stats.port_stats)
            self.port.queue_pairs_in_use = max(self.port.queue_pairs_in_use, queue_pair(index) + 1)
        was = self.running.get(index)
        if not cfg.ready:
            if was is not None:
                self.running.pop(index)
                for w in self._writers(index):
                    self._submit(w, "ring_stop", index)
            return
        shared = self._shared(index)
        if was is None or any(_restart_value(cfg, f) != _restart_value(was, f)
                              for f in _RESTART_FIELDS):
            if was is None and shared:
                # A new start of a shared ring: its owner sets the position
                # under the lock, tagged with this epoch; the other workers
                # deliver only into the start whose epoch they were given.
                self.epochs[index] = self.control.placement.next_epoch(self.index, index)
            # base None: a running ring restarts where it stopped in its worker.
            for w in self._writers(index):
                self._submit(w, "ring_start", index,
                             self._setup(cfg, cfg.base if was is None else None, shared=shared,
                                         epoch=self.epochs.get(index, 0),
                                         owner=w == self._worker_of(index)),
                             fds=self._fds(cfg))
        elif (cfg.enabled, cfg.kick_fd, cfg.call_fd, cfg.polling) != \
                (was.enabled, was.kick_fd, was.call_fd, was.polling):
            for w in self._writers(index):
                self._submit(w, "ring_update", index, cfg.enabled, cfg.kick_fd < 0,
                             fds=self._fds(cfg), key=("ring", self.index, index))
        if was is not None and any(getattr(cfg, f) != getattr(was, f) for f in _LOG_FIELDS):
            # Every worker that writes into the ring logs what it writes.
            for w in self._writers(index):
                self._submit(w, "ring_log", index, cfg.log_all, cfg.log_used, cfg.log_addr)
        self.running[index] = cfg

    @staticmethod
    def _setup(cfg, base, resume=False, shared=False, epoch=0, owner=True):
        return RingSetup(size=cfg.num, desc=cfg.desc_addr, avail=cfg.avail_addr,
                         used=cfg.used_addr, base=base, features=cfg.features,
                         event_idx=cfg.event_idx, indirect=cfg.indirect, enabled=cfg.enabled,
                         polled=cfg.kick_fd < 0, packed=cfg.packed, resume=resume,
                         log_all=cfg.log_all, log_used=cfg.log_used, log_addr=cfg.log_addr,
                         shared=shared, epoch=epoch, owner=owner)

    @staticmethod
    def _fds(cfg):
        # A ring without a kick fd is polled (and one without call fd never
        # signals): an eventfd nobody else holds keeps the worker uniform.
        return [os.dup(fd) if fd >= 0 else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                for fd in (cfg.kick_fd, cfg.call_fd)]

    async def stop_ring(self, index):
        """The StopRing effect: the worker's real last_avail_idx, or None if
        no worker ran the ring. If the worker was replaced before it
        answered, where its last published batch left the ring."""
        if self.running.pop(index, None) is None:
            return None
        futs = [self._submit(w, "ring_stop", index) for w in self._writers(index)]
        self.control.pool.hurry()
        answers = await asyncio.gather(*futs, return_exceptions=True)
        base = answers[0]                     # the owner's
        if isinstance(base, WorkerError):
            base = None
        if base is REPLACED or self._shared(index):
            # A shared ring is where its last holder left it; every worker
            # that ran it has stopped now.
            base = self.control.stats.position(self.index, index)
        return base

    def log_changed(self, area):
        """SET_LOG_BASE: check the fd (as a region's: size bounded by its real
        size) and map it here first, then every worker maps it."""
        if self.closed:
            return
        try:
            region_rules.check_log_area(area.size, area.offset, os.fstat(area.fd).st_size)
        except region_rules.RegionTableError as e:
            raise ValueError(str(e)) from None
        _map_log(area.fd, area.size, area.offset).close()     # refused here if it cannot map
        for w in range(self.control.pool.count):
            self._submit(w, "log", area.size, area.offset, fds=[os.dup(area.fd)],
                         key=("log", self.index), adjacent=True)

    def log_call_changed(self, fd):
        """SET_LOG_FD: every worker that writes the port's rings signals it."""
        if self.closed:
            return
        for w in range(self.control.pool.count):
            self._submit(w, "log_call", fds=[os.dup(fd)], key=("log_call", self.index),
                         adjacent=True)

    def replay(self, worker, regions, log_area=None, log_call=-1):
        """What a replacement worker `worker` must be told to run this port's
        rings again: (name, args, fds, port) commands."""
        if self.closed:
            return []
        cmds = []
        if regions:
            cmds.append(("mem", (self.index, [tuple(r)[1:] for r in regions]),
                         [os.dup(r.fd) for r in regions], self))
        if log_area is not None:
            # Before the rings: a ring that logs starts logging at once.
            cmds.append(("log", (self.index, log_area.size, log_area.offset),
                         [os.dup(log_area.fd)], self))
        if log_call >= 0:
            cmds.append(("log_call", (self.index,), [os.dup(log_call)], self))
        for index, cfg in sorted(self.running.items()):
            if worker not in self._writers(index):
                continue
            # Split rings resume at the used index in guest memory; packed
            # rings at the position their last published batch left (a
            # shared ring: wherever its lock's next holder finds it).
            base = self.control.stats.position(self.index, index) if cfg.packed else cfg.base
            cmds.append(("ring_start", (self.index, index,
                                        self._setup(cfg, base, resume=True,
                                                    shared=self._shared(index),
                                                    epoch=self.epochs.get(index, 0),
                                                    owner=worker == self._worker_of(index))),
                         self._fds(cfg), self))
        return cmds

    def ring_stop(self, index):
        raise RuntimeError("GET_VRING_BASE is performed asynchronously (StopRing)")

    def command_failed(self, name, message):
        self.port.command_failed(self, name, message)

    def status_changed(self, status):
        log.info("port %d: device status %#x", self.index, status)

    def send_rarp(self, mac):
        # Queue pair 0's worker sends it on as a frame from this port's guest.
        fut = self._submit(self._worker_of(0), "port_inject", rarp_frame(mac))

        def told(f):
            if not f.cancelled() and f.exception() is None and f.result() is False:
                log.warning("port %d: RARP for %s not sent: queue pair 0 is not running",
                            self.index, mac.hex(":"))
        fut.add_done_callback(told)

    def reset(self):
        if self.closed:
            return
        self.running.clear()
        for w in range(self.control.pool.count):
            self._submit(w, "port_reset")
        self.control.placement.release(self.index)

    def close(self):
        self.reset()
        self.closed = True


def listen_unix(path, mode, backlog=LISTEN_BACKLOG):
    """A non-blocking listening Unix socket at path and its file's inode. A
    stale socket file (left by a vhu that was killed) is replaced; a path
    where something live listens, or that is not a socket, is refused. The
    file gets its mode at bind (through the umask), never by path
    afterwards: a chmod by path could follow a symlink put there."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:       # a live listener whose backlog is full
            raise OSError(errno.EADDRINUSE,
                          f"{path}: a live back-end is listening there") from None
        except OSError:
            os.unlink(path)
            log.info("%s: removed a stale socket file", path)
        else:
            raise OSError(errno.EADDRINUSE, f"{path}: a live back-end is listening there")
        finally:
            probe.close()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        s.bind(path)
    except OSError:
        s.close()
        raise
    finally:
        os.umask(old)
    inode = os.lstat(path).st_ino
    s.listen(backlog)
    s.setblocking(False)
    return s, inode


def remove_socket_file(path, inode):
    """Unlink path if it is still the socket we created (not one put there since)."""
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _shrink_sealed(fd):
    try:
        return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _F_SEAL_SHRINK)
    except OSError:
        return False


class Port:
    def __init__(self, control, index, path, client=False, queues=None):
        self.control = control
        self.config = control.config
        self.index = index
        self.path = path
        self.client = client
        self.queues = control.config.queues if queues is None else queues   # offered
        self.spec = None                 # what it was made from (vhu.portspecs)
        self.listener = None
        self.conn = None
        self.session = None
        self.hooks = None
        self.task = None
        self.pending = []            # futures of worker commands for the current message
        self.created_inode = None
        self.closing = False
        self.told_unsealed = False
        self.penalty = 0.0           # seconds the port is refused after a memory fault
        self.penalty_until = 0.0
        self.newcomer = False        # a front-end waits in the backlog while one is served
        self._accepting = False
        self.queue_pairs_in_use = 0  # the most a front-end has started and enabled here
        # Front-ends in a row that left right after GET_QUEUE_NUM: QEMU with more
        # queues= than offered does so and reconnects at once, forever. Said
        # once; each next one is accepted (or connected to) a little later.
        self.queue_num_leavers = 0
        self.pause_until = 0.0

    @property
    def connected(self):
        return self.conn is not None

    @property
    def logging(self):
        """The front-end has dirty-page logging on (a migration runs): LOG_ALL and a log."""
        d = self.session.device if self.session is not None else None
        return d is not None and d.log is not None and bool(d.acked_features & F_LOG_ALL)

    @property
    def loop(self):
        return self.control.loop

    # -- sockets ------------------------------------------------------------

    def open(self):
        """Create the listening socket (server mode); nothing is accepted
        before serve()."""
        if not self.client:
            self._listen()

    def serve(self):
        if self.client:
            self.task = self.loop.create_task(self._connect_loop(), name=f"vhu-port{self.index}")
        else:
            self._accept_on()

    def _listen(self):
        self.listener, self.created_inode = listen_unix(self.path, self.config.socket_mode)
        log.info("port %d: listening on %s", self.index, self.path)

    def _accept_on(self):
        if self.listener is not None and not self._accepting and not self.closing:
            self.loop.add_reader(self.listener.fileno(), self._on_accept)
            self._accepting = True

    def _accept_off(self):
        if self._accepting:
            self.loop.remove_reader(self.listener.fileno())
            self._accepting = False

    def _on_accept(self):
        wait_until = max(self.penalty_until, self.pause_until)
        if time.monotonic() < wait_until:
            # Cut off after a memory fault, or slowing down a front-end that
            # keeps leaving after GET_QUEUE_NUM: the backlog waits.
            self._accept_off()
            self.loop.call_at(self._loop_time(wait_until), self._accept_on)
            return
        if self.conn is not None:
            # The current front-end may have gone already (its EOF not read
            # yet): let its task finish what it sent, then see.
            self.newcomer = True
            self._accept_off()
            return
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self._attach(conn)

    def _loop_time(self, monotonic):
        return self.loop.time() + (monotonic - time.monotonic())

    def _refuse_newcomer(self):
        """A second front-end while the first is still served: refused."""
        self.newcomer = False
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            conn = None
        if conn is not None:
            log.warning("port %d: %s already has a front-end; refusing another",
                        self.index, self.path)
            conn.close()
        self._accept_on()

    async def _connect_loop(self):
        """Client mode: connect (non-blocking), serve, reconnect with backoff."""
        backoff = RECONNECT_MIN
        told = False
        while not self.closing:
            wait = max(self.penalty_until, self.pause_until) - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(self.path)
            except OSError as exc:
                s.close()
                if not told:
                    why = ("its backlog is full" if isinstance(exc, BlockingIOError)
                           else exc.strerror)
                    log.info("port %d: waiting for a front-end at %s (%s)", self.index,
                             self.path, why)
                    told = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX)
                continue
            backoff, told = RECONNECT_MIN, False
            self._attach(s, own_task=False)
            try:
                await self._serve(s)
            finally:
                self._detach("connection ended")
            await asyncio.sleep(RECONNECT_MIN)

    def _attach(self, conn, own_task=True):
        conn.setblocking(False)
        self.conn = conn
        self.hooks = WorkerHooks(self)
        offered = SUPPORTED_FEATURES if self.control.config.offloads else \
            SUPPORTED_FEATURES & ~OFFLOAD_FEATURES          # --offloads off
        device = NetBackend(BackendConfig(max_queue_pairs=self.queues, features=offered),
                            self.hooks)
        self.session = Dispatcher(device)
        log.log(logging.DEBUG if self.queue_num_leavers else logging.INFO,
                "port %d: front-end connected on %s", self.index, self.path)
        if own_task:
            self.task = self.loop.create_task(self._serve_and_detach(conn),
                                              name=f"vhu-port{self.index}")

    async def _serve_and_detach(self, conn):
        reason = "front-end closed the connection"
        try:
            reason = await self._serve(conn) or reason
        finally:
            if self.conn is conn:
                self._detach(reason)

    # -- one connection ---------------------------------------------------------

    async def _serve(self, conn):
        """Read, handle, reply until the connection ends; the reason it ended."""
        deadline = None               # a message is being received: it must be whole by then
        while self.conn is conn:
            reader = self.session.reader
            try:
                # One fd more than a message may carry: the reader names the
                # excess instead of the kernel dropping it silently.
                data, fds, flags, _ = socket.recv_fds(conn, max(reader.needed(), 1), MAX_FDS + 1)
            except (BlockingIOError, InterruptedError):
                if self.newcomer and reader.buffered == 0:
                    self._refuse_newcomer()
                if not await self._wait(conn, False, deadline):
                    return f"message incomplete after {MESSAGE_TIMEOUT:g} s"
                continue
            except OSError as exc:
                return f"receive failed: {exc}"
            if flags & socket.MSG_CTRUNC:
                close_fds(fds)
                return "too many fds in one message (control data truncated)"
            if not data:
                close_fds(fds)
                return ("front-end closed the connection mid-message" if reader.buffered
                        else "front-end closed the connection")
            outcome = await self._handle(data, fds)
            if self.conn is not conn:
                return None            # cut off while handling (a fault, shutdown)
            deadline = (None if self.session.reader.buffered == 0 else
                        deadline or self.loop.time() + MESSAGE_TIMEOUT)
            if outcome.reply:
                if self.pending:
                    # The reply says the message took effect: in the workers too.
                    self.control.pool.hurry()
                    await asyncio.gather(*self.pending, return_exceptions=True)
                    if self.conn is not conn:
                        return None
                failed = await self._send(conn, outcome.reply)
                if failed:
                    return failed
            self.pending = []
            if outcome.close:
                return outcome.close
        return None

    async def _handle(self, data, fds):
        """Run the bytes through the protocol layer, doing its effects."""
        steps = self.session.steps(data, fds)
        try:
            effect = next(steps)
            while True:
                if isinstance(effect, StopRing):
                    answer = await self.hooks.stop_ring(effect.index)
                else:
                    raise TypeError(f"unknown effect {effect!r}")
                effect = steps.send(answer)
        except StopIteration as stop:
            return stop.value

    async def _send(self, conn, data):
        """Send without blocking the loop; a reason string if it failed."""
        view = memoryview(data)
        deadline = self.loop.time() + MESSAGE_TIMEOUT
        while view:
            try:
                view = view[conn.send(view):]
            except (BlockingIOError, InterruptedError):
                if not await self._wait(conn, True, deadline):
                    return f"replies not read for {MESSAGE_TIMEOUT:g} s"
            except OSError as exc:
                return f"send failed: {exc}"
        return None

    async def _wait(self, conn, writable, deadline):
        """Until conn is readable (writable); False if the deadline passed."""
        fut = self.loop.create_future()
        fd = conn.fileno()

        def ready():
            if not fut.done():
                fut.set_result(True)
        (self.loop.add_writer if writable else self.loop.add_reader)(fd, ready)
        try:
            timeout = None if deadline is None else max(0.0, deadline - self.loop.time())
            await asyncio.wait_for(fut, timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            (self.loop.remove_writer if writable else self.loop.remove_reader)(fd)

    def _detach(self, reason):
        """The connection is over: release its state now (synchronously: a
        replacement worker must not be given a port that was cut off)."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        self._note_queue_num_leaver(self.session.device.only_asked_queue_num)
        log.log(logging.DEBUG if self.queue_num_leavers > 1 else logging.INFO,
                "port %d: disconnected: %s", self.index, reason)
        session, self.session = self.session, None
        hooks, self.hooks = self.hooks, None
        self.pending = []
        try:
            session.close()               # releases every fd it kept; resets the rings
        finally:
            hooks.closed = True
            conn.close()
        task = self.task
        if task is not None and task is not asyncio.current_task() and not self.client:
            task.cancel()
        if not self.client:
            self.task = None
            if self.newcomer:
                self.newcomer = False
            self._accept_on()

    def _note_queue_num_leaver(self, left_after_queue_num):
        """Count front-ends leaving right after GET_QUEUE_NUM; the next
        connection waits RECONNECT_MIN, doubling to RECONNECT_MAX, while they go on."""
        if not left_after_queue_num:
            if self.queue_num_leavers > 1:
                log.info("port %d: %d front-ends in a row had left after GET_QUEUE_NUM",
                         self.index, self.queue_num_leavers)
            self.queue_num_leavers = 0
            return
        self.queue_num_leavers += 1
        if self.queue_num_leavers == 1:
            log.warning("port %d: the front-end left right after asking how many queue pairs "
                        "this port offers (%d): it wants more (QEMU: \"you are asking more queues "
                        "than supported\"); give vhu.master a larger --queues. Its retries are "
                        "logged at DEBUG and served at most every %g s", self.index,
                        self.queues, QUEUE_NUM_PAUSE_MAX)
        pause = min(RECONNECT_MIN * 2 ** self.queue_num_leavers, QUEUE_NUM_PAUSE_MAX)
        self.pause_until = time.monotonic() + pause

    # -- what the control loop asks ---------------------------------------------

    def replay(self, worker):
        if self.hooks is None or self.session is None:
            return []
        device = self.session.device
        return self.hooks.replay(worker, device.regions, device.log, device.log_call_fd)

    def memory_fault(self, sig, addr):
        """Guest memory of this port killed a worker: count it on every ring,
        cut the front-end off, refuse it for a while."""
        rings = self.config.rings_per_port
        for ring in range(rings):
            self.control.stats.count(self.index, ring, "broken_memory_fault")
        self.penalty = min(max(self.penalty * 2, PENALTY_MIN), PENALTY_MAX)
        self.penalty_until = time.monotonic() + self.penalty
        self._detach(f"its memory faulted a worker (signal {sig} at {addr:#x}); not served "
                     f"for {self.penalty:g} s")

    def command_failed(self, hooks, name, message):
        """A worker refused a command of connection `hooks` (if it is still the current one)."""
        if hooks is self.hooks:
            self._detach(f"worker refused {name}: {message}")

    def close(self):
        self.closing = True
        self._detach("shutting down")
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.listener is not None:
            self._accept_off()
            self.listener.close()
            self.listener = None
            remove_socket_file(self.path, self.created_inode)
