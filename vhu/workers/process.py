"""Worker processes: each owns some queue pairs and runs the compiled loop.

The master starts workers with an explicit multiprocessing context (spawn:
nothing is inherited but what is passed) and talks to each over its own
SOCK_SEQPACKET socketpair: one pickled command per packet, region fds and
kick/call eventfds riding along with SCM_RIGHTS. A worker is told only when
a queue's state changes; between commands it stays inside Engine.run(),
which returns as soon as the control socket is readable. So a command (a new
memory table, say) is applied between two batches: the rings are quiescent,
no chain is half-processed, nothing is lost or duplicated.

Ring numbering is virtio-net's: ring 2i is queue pair i's RX (we fill it),
ring 2i+1 its TX (the guest sends on it).
"""
import logging
import mmap
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import traceback
from dataclasses import dataclass, field

import numpy as np

from vhu._mem import GuestMemory
from vhu._ring import COUNTER_NAMES, DeviceRing
from vhu.workers._engine import Engine

log = logging.getLogger(__name__)

MAX_MSG = 1 << 16
MAX_FDS = 16
CONTROL_TIMEOUT = 10.0
COUNTERS_PER_RING = len(COUNTER_NAMES)


def counter_offset(port, ring, rings_per_port):
    """Byte offset of (port, ring)'s counters in the shared stats memory."""
    return ((port * rings_per_port) + ring) * COUNTERS_PER_RING * 8


@dataclass
class RingSetup:
    """What a worker needs to run one ring (from SET_VRING_NUM/ADDR/BASE and features)."""
    size: int
    desc: int
    avail: int
    used: int
    base: int
    features: int
    event_idx: bool
    indirect: bool
    enabled: bool
    polled: bool = False        # no kick fd: the ring is polled, never slept on
    packed: bool = False        # VIRTIO_F_RING_PACKED: base carries the wrap counter in bit 15


@dataclass
class _Ring:
    ring: DeviceRing
    kick: int = -1
    call: int = -1
    enabled: bool = True
    polled: bool = False


@dataclass
class _Port:
    mem: GuestMemory = field(default_factory=GuestMemory)
    rings: dict = field(default_factory=dict)     # ring index -> _Ring


def _close(fd):
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


class WorkerState:
    """The worker side: applies commands, keeps the engine's bindings current."""

    def __init__(self, index, config, stats_fd):
        self.index = index
        self.config = config
        self.ports = {}
        self.stats_map = mmap.mmap(stats_fd, 0) if stats_fd >= 0 else None
        _close(stats_fd)
        self.engine = None
        self.captures = {}          # port -> (rx slot, tx slot, [fds])
        self.taps = {}              # port -> TAP fd (vhu.tap)

    # Each command is a method named after it; returns the reply value.

    def cmd_mem(self, port, regions, fds):
        """A new memory table for port: regions (gpa, size, uva, offset), one fd each."""
        p = self.ports.setdefault(port, _Port())
        try:
            p.mem.set_table([(fd, *r) for fd, r in zip(fds, regions)])
        finally:
            for fd in fds:
                _close(fd)
        # Rings re-translate on their next batch (generation check); a ring
        # that no longer maps is marked broken there.
        return p.mem.nregions

    def cmd_ring_start(self, port, index, setup, fds):
        """Start ring `index` of port (fds: [kick or -1, call or -1])."""
        p = self.ports.setdefault(port, _Port())
        kick, call = (list(fds) + [-1, -1])[:2]
        self._stop(p, index)
        try:
            ring = DeviceRing(p.mem, setup.size, setup.desc, setup.avail, setup.used,
                              addr_space="uva", event_idx=setup.event_idx,
                              indirect=setup.indirect, features=setup.features,
                              packed=setup.packed)
        except Exception:
            _close(kick)
            _close(call)
            raise
        ring.last_avail_idx = self._start_index(p.mem, index, setup)
        if self.stats_map is not None:
            ring.bind_counters(self.stats_map,
                               counter_offset(port, index, self.config["rings_per_port"]))
        p.rings[index] = _Ring(ring, kick, call, setup.enabled, setup.polled)
        self._rebind()
        return True

    @staticmethod
    def _start_index(mem, index, setup):
        """SET_VRING_BASE's index, unless a split ring's used->idx says otherwise.

        vhu keeps no inflight state, so a ring (re)starts with nothing in
        flight: the next used entry goes at used->idx, where the driver looks.
        A base that differs (a front-end whose saved index ran ahead of the
        used ring, e.g. after its back-end was killed mid-batch) would make
        vhu publish used entries past ones it never wrote, which the guest
        driver reads as garbage ids. Resuming at used->idx (as DPDK's
        lib/vhost does) re-sends a few TX chains at worst. QEMU itself sends
        used->idx after losing its back-end, so then they agree. Packed rings
        have no such index: the base (with its wrap counter) is used as is."""
        if setup.packed:
            return setup.base
        used_idx = int.from_bytes(bytes(mem.view_uva(setup.used + 2, 2)), "little")
        if used_idx != setup.base:
            log.warning("ring %d: base %d but used->idx is %d: resuming at %d (frames in "
                        "flight may be sent again)", index, setup.base, used_idx, used_idx)
        return used_idx

    def cmd_ring_enable(self, port, index, enabled):
        r = self.ports.get(port, _Port()).rings.get(index)
        if r is not None:
            r.enabled = bool(enabled)
            self._rebind()
        return True

    def cmd_ring_kick(self, port, index, fds):
        r = self.ports.get(port, _Port()).rings.get(index)
        new = fds[0] if fds else -1
        if r is None:
            _close(new)
            return False
        _close(r.kick)
        r.kick = new
        self._rebind()
        return True

    def cmd_ring_call(self, port, index, fds):
        r = self.ports.get(port, _Port()).rings.get(index)
        new = fds[0] if fds else -1
        if r is None:
            _close(new)
            return False
        _close(r.call)
        r.call = new
        self._rebind()
        return True

    def cmd_ring_stop(self, port, index):
        """GET_VRING_BASE: stop the ring; reply its real last_avail_idx."""
        p = self.ports.get(port)
        base = self._stop(p, index) if p else None
        self._rebind()
        return base

    def cmd_port_reset(self, port):
        p = self.ports.pop(port, None)
        if p is not None:
            for index in list(p.rings):
                self._stop(p, index)
            p.mem.clear()
        self._rebind()
        return True

    def cmd_tap(self, port, fds):
        """A TAP device as port `port` (queue pair 0): fds = [its fd]."""
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            raise ValueError("tap: one fd")
        _close(self.taps.pop(port, None))
        self.taps[port] = fds[0]
        self._rebind()
        return True

    def cmd_tap_close(self, port):
        fd = self.taps.pop(port, None)
        self._rebind()
        _close(fd)
        return True

    def cmd_port_inject(self, port, frame):
        """A frame as if port's guest had sent it on queue pair 0 (SEND_RARP)."""
        return self.engine is not None and self.engine.inject(port, frame)

    def cmd_ring_status(self, port, index):
        r = self.ports.get(port, _Port()).rings.get(index)
        if r is None:
            return None
        return {"last_avail_idx": r.ring.last_avail_idx, "broken": r.ring.broken_reason}

    def _stop(self, p, index):
        r = p.rings.pop(index, None)
        if r is None:
            return None
        _close(r.kick)
        _close(r.call)
        # GET_VRING_BASE: the next avail index (packed: position | wrap << 15).
        return r.ring.last_avail_idx

    def _rebind(self):
        """Rebuild the engine's queue-pair table from the started rings."""
        pairs, where = [], {}
        for port in sorted(self.ports):
            rings = self.ports[port].rings
            for qp in sorted({i // 2 for i in rings}):
                rx, tx = rings.get(2 * qp), rings.get(2 * qp + 1)
                where[(port, qp)] = len(pairs)
                pairs.append(dict(
                    rx=rx.ring if rx else None, tx=tx.ring if tx else None,
                    rx_enabled=bool(rx and rx.enabled), tx_enabled=bool(tx and tx.enabled),
                    rx_call=rx.call if rx else -1, tx_call=tx.call if tx else -1,
                    rx_kick=-1 if not rx or rx.polled else rx.kick,
                    tx_kick=-1 if not tx or tx.polled else tx.kick,
                    port=port, qp=qp, queue=qp))
        for port in sorted(self.taps):
            # Its counters sit where a ring pair's would: the stats stay one table.
            off = counter_offset(port, 0, self.config["rings_per_port"])
            counters = (np.frombuffer(self.stats_map, np.uint64, 2 * COUNTERS_PER_RING, off)
                        if self.stats_map is not None else np.zeros(2 * COUNTERS_PER_RING, np.uint64))
            where[(port, 0)] = len(pairs)
            pairs.append(dict(tap_fd=self.taps[port], tap_counters=counters, port=port, qp=0,
                              queue=0))
        app = self.config["app"]
        for pair in pairs:
            if self.config.get("pcap_dir"):
                pair["cap_rx"], pair["cap_tx"], _ = self._capture(pair["port"])
            if app == "echo":
                pair["peer"] = where[(pair["port"], pair["qp"])]
            elif app == "patch":
                other = 1 - pair["port"]
                pair["peer"] = where.get((other, pair["qp"]), -1)
            else:
                pair["peer"] = -1
        self.engine.set_bindings(pairs)

    def _capture(self, port):
        """The port's pcap files (vhu's rx and tx), opened on first use: see
        pcap_path. The engine appends records with write(2); we write the
        classic libpcap header (microsecond timestamps, DLT_EN10MB)."""
        if port not in self.captures:
            slots, fds = [], []
            snaplen = self.config.get("snaplen", 65535)
            for direction in ("rx", "tx"):
                path = pcap_path(self.config["pcap_dir"], port, direction, self.index,
                                 self.config.get("pcap_per_worker", False))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                fds.append(fd)
                os.write(fd, PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
                slots.append(self.engine.add_capture(fd, snaplen))
            self.captures[port] = (slots[0], slots[1], fds)
        return self.captures[port]

    def close(self):
        for port in list(self.ports):
            self.cmd_port_reset(port)
        for port in list(self.taps):
            self.cmd_tap_close(port)
        if self.engine is not None:
            self.engine.flush()
        for _, _, fds in self.captures.values():
            for fd in fds:
                _close(fd)
        self.captures = {}
        if self.stats_map is not None:
            self.stats_map.close()


PCAP_HEADER = struct.Struct("<IHHiIII")


def pcap_path(directory, port, direction, worker=0, per_worker=False):
    """DIR/<port>-<rx|tx>.pcap; with several workers each writes its own
    files, DIR/<port>-<rx|tx>-w<worker>.pcap (one writer per file, no locks).
    rx: frames vhu received from the port's front-end; tx: frames vhu sent it."""
    suffix = f"-w{worker}" if per_worker else ""
    return os.path.join(directory, f"{port}-{direction}{suffix}.pcap")


def worker_main(index, sock, config, stats_sock):
    """Entry point of a worker process (spawned: inherits nothing implicit)."""
    logging.basicConfig(level=config.get("log_level", "INFO"),
                        format=f"%(asctime)s vhu.worker{index} %(levelname)s %(message)s")
    # The master decides when we stop (a signal to our process group must not
    # kill a worker mid-command); we exit when its control socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if config.get("cpu") is not None:
        os.sched_setaffinity(0, {config["cpu"]})
    _, stats_fds, _, _ = socket.recv_fds(stats_sock, 16, 1)
    stats_sock.close()
    state = WorkerState(index, config, stats_fds[0] if stats_fds else -1)
    state.engine = Engine(app=config["app"], poll=config["poll"], batch=config["batch"],
                          ctrl_fd=sock.fileno(), frame=config.get("frame", b""),
                          stage=config.get("stage"), mac_ageing=config.get("mac_ageing", 300.0))
    state._rebind()
    sock.setblocking(False)
    try:
        while True:
            state.engine.run(0.5)
            while True:
                try:
                    data, fds, _, _ = socket.recv_fds(sock, MAX_MSG, MAX_FDS)
                except BlockingIOError:
                    break
                if not data:
                    return          # the master went away
                name, args = pickle.loads(data)
                if name == "quit":
                    sock.setblocking(True)
                    sock.send(pickle.dumps(("ok", True)))
                    return
                try:
                    handler = getattr(state, "cmd_" + name)
                    if fds or name in ("mem", "ring_start", "ring_call", "ring_kick", "tap"):
                        result = ("ok", handler(*args, fds=list(fds)))
                    else:
                        result = ("ok", handler(*args))
                except Exception as exc:
                    log.error("command %s failed: %s", name, exc)
                    for fd in fds:
                        _close(fd)
                    result = ("error", f"{type(exc).__name__}: {exc}",
                              traceback.format_exc())
                sock.setblocking(True)
                sock.send(pickle.dumps(result))
                sock.setblocking(False)
    finally:
        state.close()
        sock.close()


class WorkerError(RuntimeError):
    pass


class WorkerHandle:
    """The master's side of one worker process."""

    def __init__(self, index, config, stats_fd, ctx=None):
        self.index = index
        self.config = config
        ctx = ctx or multiprocessing.get_context("spawn")
        self.sock, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stats_parent, stats_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.process = ctx.Process(target=worker_main, name=f"vhu-worker{index}",
                                   args=(index, child, config, stats_child), daemon=True)
        self.process.start()
        child.close()
        stats_child.close()
        socket.send_fds(stats_parent, [b"stats"], [stats_fd] if stats_fd >= 0 else [])
        stats_parent.close()
        self.sock.settimeout(CONTROL_TIMEOUT)

    def call(self, name, *args, fds=()):
        """Run a command in the worker; its reply value, or WorkerError.
        The fds are handed over: this process's copies are closed once sent."""
        data = pickle.dumps((name, args))
        try:
            socket.send_fds(self.sock, [data], list(fds)) if fds else self.sock.send(data)
            reply = self.sock.recv(MAX_MSG)
        except (OSError, socket.timeout) as exc:
            raise WorkerError(f"worker {self.index}: {name}: {exc}") from exc
        finally:
            for fd in fds:
                _close(fd)
        if not reply:
            raise WorkerError(f"worker {self.index} exited (code {self.process.exitcode})")
        status, value, *rest = pickle.loads(reply)
        if status != "ok":
            raise WorkerError(f"worker {self.index}: {name}: {value}")
        return value

    def stop(self, timeout=5.0):
        if self.process.is_alive():
            try:
                self.call("quit")
            except WorkerError:
                pass
            self.process.join(timeout)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(timeout)
        self.sock.close()
        self.process.close() if self.process.exitcode is not None else None
