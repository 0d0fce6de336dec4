"""Worker processes: each owns some queue pairs and runs the compiled loop.

The master's supervisor (vhu.workers.supervisor) starts workers with an
explicit multiprocessing context (spawn: nothing is inherited but what is
passed) and talks to each over its own channel (vhu.workers.channel): packets
of commands, region fds and kick/call eventfds riding along with SCM_RIGHTS.
A worker is told only when a queue's state changes; between packets it stays
inside Engine.run(), which returns as soon as the channel is readable. So a
command (a new memory table, say) is applied between two batches: the rings
are quiescent, no chain is half-processed, nothing is lost or duplicated.
A packet's commands are applied in order and the engine's bindings are
rebuilt at most once per packet, and only when the set of rings changed:
an enable toggle or a new call fd changes one binding in place.

What the master watches: a heartbeat the engine bumps about every
millisecond, the ring positions the engine publishes into the shared stats
memory with every batch (a replacement worker resumes there), and a fault
slot the fault guard (vhu.workers._guard) fills if guest memory kills us.

Ring numbering is virtio-net's: ring 2i is queue pair i's RX (we fill it),
ring 2i+1 its TX (the guest sends on it).
"""
import logging
import mmap
import os
import signal
import socket
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from vhu._mem import GuestMemory
from vhu._ring import DeviceRing
from vhu.netqueues import RECEIVEQ, TRANSMITQ, is_transmitq, queue_pair, ring_index, side
from vhu.stats import COUNTERS_PER_RING, WorkerSlot, counter_offset
from vhu.tap import TAP_FEATURES, vnet_hdr_len
from vhu.workers import _guard, channel
from vhu.workers._engine import Engine, VxlanSocket

log = logging.getLogger(__name__)

__all__ = ["RingSetup", "WorkerState", "worker_main", "pcap_path", "PCAP_HEADER",
           "counter_offset"]


@dataclass
class RingSetup:
    """What a worker needs to run one ring (from SET_VRING_NUM/ADDR/BASE and features)."""
    size: int
    desc: int
    avail: int
    used: int
    base: Optional[int]         # None: where this ring stopped in this worker (a restart)
    features: int
    event_idx: bool
    indirect: bool
    enabled: bool
    polled: bool = False        # no kick fd: the ring is polled, never slept on
    packed: bool = False        # VIRTIO_F_RING_PACKED: base carries the wrap counter in bit 15
    resume: bool = False        # a replacement worker takes the ring over (see DeviceRing.resume)
    # Dirty-page logging (a migration): LOG_ALL, and SET_VRING_ADDR's
    # VHOST_VRING_F_LOG with its log_guest_addr (used-ring writes).
    log_all: bool = False
    log_used: bool = False
    log_addr: int = 0
    shared: bool = False        # an RX ring other workers deliver into too: locked (_shared.pxi)
    epoch: int = 0              # shared: which start of the ring this is (the master counts)
    owner: bool = True          # shared: this worker polls the queue pair and starts the ring


@dataclass
class _Ring:
    ring: DeviceRing
    kick: int = -1
    call: int = -1
    enabled: bool = True
    polled: bool = False
    features: int = 0           # negotiated: the engine reads the offloads it allows
    log_all: bool = False
    log_used: bool = False
    log_addr: int = 0
    shared: bool = False
    epoch: int = 0


@dataclass
class _Port:
    mem: GuestMemory = field(default_factory=GuestMemory)
    rings: dict = field(default_factory=dict)     # ring index -> _Ring
    log: Optional[tuple] = None                   # (mmap, offset in it, size): SET_LOG_BASE
    log_call: int = -1                            # SET_LOG_FD's eventfd, -1: none


def _close(fd):
    if fd is not None and fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass


def _nonblocking(fd):
    """Kick and call eventfds are used non-blocking (a full eventfd counter
    must never block the worker). The file description is the front-end's
    too; QEMU and DPDK create theirs non-blocking anyway."""
    if fd >= 0:
        os.set_blocking(fd, False)
    return fd


# Commands: name -> handler (a WorkerState method named cmd_<name>, taking
# the command's args and fds=[the fds that came with it]; returns the reply).
COMMANDS = {}


def command(fn):
    COMMANDS[fn.__name__[len("cmd_"):]] = fn
    return fn


class WorkerState:
    """The worker side: applies commands, keeps the engine's bindings current."""

    def __init__(self, config, stats_fd):
        self.config = config
        self.index = None
        self.ports = {}
        self.stats_map = mmap.mmap(stats_fd, 0) if stats_fd >= 0 else None
        _close(stats_fd)
        self.engine = None
        self.macs_map = None        # the shared MAC table (switch), mapped
        self.captures = {}          # port -> (rx slot, tx slot, [fds])
        self.taps = {}              # port -> TAP fd (vhu.tap)
        self.tap_hdr = {}           # port -> its virtio-net header bytes (IFF_VNET_HDR), or 0
        self.vxlans = {}            # port -> (VxlanSocket, its per-remote counters' mapping)
        self.vxlan_write_only = set()  # VXLAN ports another worker reads (we only send)
        self.tap_write_only = set()  # TAP ports another worker reads (we only write)
        self.dirty = False          # the set of rings changed: rebind after the packet
        self.quit = False

    def run_packet(self, commands, fds):
        """Apply a packet's commands in order; their (status, value) replies."""
        results, fds = [], list(fds)
        for name, args, nfds in commands:
            mine, fds = fds[:nfds], fds[nfds:]
            handler = COMMANDS.get(name)
            try:
                if handler is None:
                    raise ValueError(f"unknown command {name!r}")
                results.append((channel.OK, handler(self, *args, fds=mine)))
            except (ValueError, KeyError, OSError) as exc:
                # Expected refusals (a table that no longer maps, an fd the
                # engine cannot watch): one line, no traceback.
                log.warning("command %s refused: %s", name, exc)
                for fd in mine:
                    _close(fd)
                results.append((channel.ERROR, f"{type(exc).__name__}: {exc}"))
            except Exception as exc:
                log.exception("command %s failed", name)
                for fd in mine:
                    _close(fd)
                results.append((channel.ERROR, f"{type(exc).__name__}: {exc}"))
        for fd in fds:                 # more fds than the commands claimed
            _close(fd)
        if self.dirty:
            self.dirty = False
            self._rebind()
        return results

    # -- commands -------------------------------------------------------------

    @command
    def cmd_assign(self, index, cpu, replacing, generation=0, fds=()):
        """Become worker `index` (heartbeat and fault slot), pinned to cpu;
        replacing: an earlier worker `index` died, whose capture files we
        continue (port_open)."""
        self.index = index
        self.engine.set_worker(index, generation)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        if self.stats_map is not None:
            slot = WorkerSlot.offset(self.config["stats_layout"], index)
            self.engine.set_heartbeat(self.stats_map, slot + WorkerSlot.HEARTBEAT)
            self.engine.set_load(self.stats_map, slot + WorkerSlot.LOAD)
            _guard.install(self.stats_map, slot + WorkerSlot.FAULT)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(
                f"%(asctime)s vhu.worker{index} %(levelname)s %(message)s"))
        return os.getpid()

    @command
    def cmd_port_open(self, port, new, fds):
        """Port `port` exists: its capture files open now (not on first
        traffic: they exist from the start, and what a worker holds does not
        grow with traffic). new: a port just added (its files start empty)
        rather than one this worker takes over (its files continue)."""
        if self.config.get("pcap_dir"):
            self._capture(port, continuing=not new)
        return True

    @command
    def cmd_port_close(self, port, fds):
        """Port `port` was removed: rings stopped, memory unmapped, TAP
        closed, captures written out and closed, its MAC entries forgotten."""
        self.cmd_port_reset(port, fds=[])
        fd = self.taps.pop(port, None)
        vx = self.vxlans.pop(port, None)
        caps = self.captures.pop(port, None)
        if fd is not None or caps is not None or vx is not None:
            self._rebind()                # nothing may point at them any more
        _close(fd)
        self._vxlan_release(vx)
        if caps is not None:
            for slot in caps[:2]:
                if slot >= 0:
                    self.engine.close_capture(slot)
            for cap_fd in caps[2]:
                _close(cap_fd)
        self.engine.forget_port(port)
        return True

    @command
    def cmd_mac_table(self, fds):
        """The switch's live stations: (mac, port, seconds since last seen)."""
        return self.engine.mac_entries()

    @command
    def cmd_log_level(self, level, fds):
        logging.getLogger().setLevel(level)
        return True

    @command
    def cmd_mem(self, port, regions, fds):
        """A new memory table for port: regions (gpa, size, uva, offset), one fd each."""
        p = self.ports.setdefault(port, _Port())
        try:
            p.mem.set_table([(fd, *r) for fd, r in zip(fds, regions)])
        finally:
            for fd in fds:
                _close(fd)
        self._guard_ranges()
        # Rings re-translate on their next batch (generation check); a ring
        # that no longer maps is marked broken there.
        return p.mem.nregions

    @command
    def cmd_ring_start(self, port, index, setup, fds):
        """Start ring `index` of port (fds: [kick, call], -1 not sent)."""
        p = self.ports.setdefault(port, _Port())
        kick, call = (list(fds) + [-1, -1])[:2]
        old = p.rings.get(index)
        base = setup.base
        if base is None:
            base = old.ring.last_avail_idx if old is not None else 0
        try:
            ring = DeviceRing(p.mem, setup.size, setup.desc, setup.avail, setup.used,
                              addr_space="uva", event_idx=setup.event_idx,
                              indirect=setup.indirect, features=setup.features,
                              packed=setup.packed, device_reads=is_transmitq(index))
            if setup.shared:
                # The ring's position is shared (the master set it; other
                # workers may be publishing): ours is private until we take
                # its lock, which reloads it.
                ring.last_avail_idx = self._start_index(p.mem, index, setup, base)
            if self.stats_map is not None:
                # Counters (and the position) survive a restart of the ring.
                ring.bind_counters(self.stats_map, counter_offset(
                    port, index, self.config["rings_per_port"]))
            if not setup.shared:
                ring.last_avail_idx = self._start_index(p.mem, index, setup, base)
            elif setup.owner and not setup.resume and setup.base is not None:
                # A fresh start: its position set under the lock, so that a
                # worker still delivering into the previous start cannot
                # publish over it (it sees the new epoch and stops).
                if not self.engine.begin_shared_ring(ring, setup.epoch,
                                                     ring.last_avail_idx):
                    log.warning("port %d ring %d: its lock stayed taken; started anyway",
                                port, index)
        except Exception:
            _close(kick)
            _close(call)
            raise
        if setup.resume:
            skipped = ring.resume()
            if skipped:
                log.warning("port %d ring %d: %d used descriptors past the last published "
                            "position skipped (the previous worker died while publishing)",
                            port, index, skipped)
        self._stop(p, index)
        r = p.rings[index] = _Ring(ring, _nonblocking(kick), _nonblocking(call), setup.enabled,
                                   setup.polled, features=setup.features, log_all=setup.log_all,
                                   log_used=setup.log_used, log_addr=setup.log_addr,
                                   shared=setup.shared, epoch=setup.epoch)
        self._apply_log(p, r)
        self.dirty = True
        return True

    @command
    def cmd_log(self, port, size, offset, fds):
        """SET_LOG_BASE: map the dirty log (fds: [its fd]); the port's rings
        that log switch to it (between batches: this is a command), and the
        old one is unmapped once no ring points into it."""
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            raise ValueError("log: one fd")
        try:
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            m = mmap.mmap(fds[0], size + offset - start, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        finally:
            _close(fds[0])
        p = self.ports.setdefault(port, _Port())
        p.log = (m, offset - start, size)
        for r in p.rings.values():
            self._apply_log(p, r)
        self._guard_ranges()
        return True

    @command
    def cmd_log_call(self, port, fds):
        """SET_LOG_FD: the eventfd the engine signals after a round that
        marked the port's log (fds: [it]), replacing an earlier one."""
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            raise ValueError("log_call: one fd")
        p = self.ports.setdefault(port, _Port())
        _close(p.log_call)
        p.log_call = _nonblocking(fds[0])
        self.dirty = True
        return True

    @command
    def cmd_ring_log(self, port, index, log_all, log_used, log_addr, fds):
        """LOG_ALL or SET_VRING_ADDR's log flag/address changed on a running
        ring: logging goes on or off in place, between two batches."""
        p = self.ports.get(port)
        r = p.rings.get(index) if p is not None else None
        if r is None:
            return None       # not running here: its next ring_start carries the state
        r.log_all, r.log_used, r.log_addr = bool(log_all), bool(log_used), int(log_addr)
        self._apply_log(p, r)
        return r.ring.logging

    @staticmethod
    def _apply_log(p, r):
        if r.log_all and p.log is not None:
            m, off, size = p.log
            r.ring.set_log(m, off, size, log_used=r.log_used, used_gpa=r.log_addr)
        else:
            r.ring.set_log(None)

    @staticmethod
    def _start_index(mem, index, setup, base):
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
            return base
        used_idx = int.from_bytes(bytes(mem.view_uva(setup.used + 2, 2)), "little")
        if used_idx != base and not setup.resume and not setup.shared:
            log.warning("ring %d: base %d but used->idx is %d: resuming at %d (frames in "
                        "flight may be sent again)", index, base, used_idx, used_idx)
        return used_idx

    @command
    def cmd_ring_update(self, port, index, enabled, polled, fds):
        """A running ring's enable flag and its kick and call fds ([kick, call],
        -1 for none), changed in place: nothing else is rebound."""
        kick, call = (list(fds) + [-1, -1])[:2]
        r = self.ports.get(port, _Port()).rings.get(index)
        if r is None:
            _close(kick)
            _close(call)
            raise KeyError(f"port {port} ring {index} is not running here")
        _nonblocking(kick)
        _nonblocking(call)
        if not self.dirty:
            try:
                self.engine.update_ring(port, queue_pair(index), side(index), bool(enabled),
                                        -1 if polled else kick, call)
            except (KeyError, OSError):
                _close(kick)
                _close(call)
                raise
        old_kick, old_call = r.kick, r.call
        r.kick, r.call, r.enabled, r.polled = kick, call, bool(enabled), bool(polled)
        _close(old_kick)
        _close(old_call)
        return True

    @command
    def cmd_ring_stop(self, port, index, fds):
        """GET_VRING_BASE: stop the ring; reply its real last_avail_idx."""
        p = self.ports.get(port)
        base = self._stop(p, index) if p else None
        if base is not None:
            self.dirty = True
        return base

    @command
    def cmd_port_reset(self, port, fds):
        p = self.ports.pop(port, None)
        if p is not None:
            for index in list(p.rings):
                self._stop(p, index)
            self.dirty = True
            self._rebind()            # before the mappings go: the engine still points there
            p.mem.clear()
            p.log = None              # unmapped as the last ring holding it goes
            _close(p.log_call)
            self._guard_ranges()
        return True

    @command
    def cmd_tap(self, port, write_only=False, fds=()):
        """A TAP device as port `port` (queue pair 0): fds = [its fd]."""
        if len(fds) != 1:
            for fd in fds:
                _close(fd)
            raise ValueError("tap: one fd")
        _close(self.taps.pop(port, None))
        self.taps[port] = fds[0]
        self.tap_hdr[port] = vnet_hdr_len(fds[0])
        if write_only:
            self.tap_write_only.add(port)     # another worker reads it
        else:
            self.tap_write_only.discard(port)
        self.dirty = True
        return True

    @command
    def cmd_vxlan(self, port, vni, remotes, udp_port, max_inner, connected, write_only=False,
                  fds=()):
        """A VXLAN port as port `port` (queue pair 0): fds = [receive socket,
        send sockets (connected to the one remote if `connected`)..., per-remote
        counters memfd] (vhu.vxlanport). write_only: another worker reads the
        receive socket; this one only sends (frames from its queue pairs)."""
        if len(fds) < 3:
            for fd in fds:
                _close(fd)
            raise ValueError("vxlan: a receive socket, send sockets and a counters memfd")
        recv_fd, send_fds, mem_fd = fds[0], fds[1:-1], fds[-1]
        try:
            mapping = mmap.mmap(mem_fd, 0)
        except (OSError, ValueError):
            for fd in fds:
                _close(fd)
            raise
        finally:
            _close(mem_fd)
        try:
            vx = VxlanSocket(recv_fd, send_fds, vni, remotes, udp_port, max_inner,
                             np.frombuffer(mapping, np.uint64), connected)
        except BaseException:
            try:
                mapping.close()
            except BufferError:            # a view is still alive: unmapped when it goes
                pass
            raise                          # VxlanSocket closed the sockets
        old = self.vxlans.pop(port, None)
        if old is not None:
            self._rebind()
            self._vxlan_release(old)
        self.vxlans[port] = (vx, mapping)
        if write_only:
            self.vxlan_write_only.add(port)   # another worker reads its socket
        else:
            self.vxlan_write_only.discard(port)
        self.dirty = True
        return vx.max_inner

    @command
    def cmd_vxlan_close(self, port, fds):
        vx = self.vxlans.pop(port, None)
        if vx is not None:
            self._rebind()
            self._vxlan_release(vx)
        return True

    @command
    def cmd_vxlan_fdb(self, fds):
        """Every VXLAN port's learned inner MACs: {port: [(mac, remote, age)]}."""
        return {port: vx.fdb() for port, (vx, _) in self.vxlans.items()}

    @staticmethod
    def _vxlan_release(entry):
        """Close a VXLAN port's sockets (the engine is rebound without it)."""
        if entry is not None:
            entry[0].close()

    @command
    def cmd_tap_close(self, port, fds):
        fd = self.taps.pop(port, None)
        if fd is not None:
            self._rebind()
            _close(fd)
        return True

    @command
    def cmd_port_inject(self, port, frame, fds):
        """A frame as if port's guest had sent it on queue pair 0 (SEND_RARP)."""
        if self.dirty:
            self.dirty = False
            self._rebind()
        return self.engine is not None and self.engine.inject(port, frame)

    @command
    def cmd_ring_status(self, port, index, fds):
        r = self.ports.get(port, _Port()).rings.get(index)
        if r is None:
            return None
        return {"last_avail_idx": r.ring.last_avail_idx, "broken": r.ring.broken_reason}

    @command
    def cmd_ping(self, fds):
        """Answered once the worker has started (the supervisor's readiness check)."""
        return os.getpid()

    @command
    def cmd_quit(self, fds):
        self.quit = True
        return True

    # -- internals ------------------------------------------------------------

    def _guard_ranges(self):
        """Tell the fault guard where each port's memory lies in this process."""
        ranges = [(addr, length, port) for port, p in self.ports.items()
                  for addr, length in p.mem.host_ranges()]
        for port, p in self.ports.items():
            if p.log is not None:     # the dirty log is the front-end's memory too
                ranges.append((np.frombuffer(p.log[0], np.uint8).ctypes.data, len(p.log[0]),
                               port))
        _guard.set_ranges(ranges)

    def _stop(self, p, index):
        r = p.rings.pop(index, None)
        if r is None:
            return None
        _close(r.kick)
        _close(r.call)
        # Before GET_VRING_BASE's reply: every page written is marked by now.
        r.ring.flush_log()
        # GET_VRING_BASE: the next avail index (packed: position | wrap << 15).
        return r.ring.last_avail_idx

    def _rebind(self):
        """Rebuild the engine's queue-pair table from the started rings."""
        self.dirty = False
        pairs, where = [], {}
        for port in sorted(self.ports):
            rings = self.ports[port].rings
            for qp in sorted({queue_pair(i) for i in rings}):
                rx, tx = rings.get(ring_index(qp, RECEIVEQ)), rings.get(ring_index(qp, TRANSMITQ))
                where[(port, qp)] = len(pairs)
                pairs.append(dict(
                    rx=rx.ring if rx else None, tx=tx.ring if tx else None,
                    rx_enabled=bool(rx and rx.enabled), tx_enabled=bool(tx and tx.enabled),
                    rx_call=rx.call if rx else -1, tx_call=tx.call if tx else -1,
                    rx_kick=-1 if not rx or rx.polled else rx.kick,
                    tx_kick=-1 if not tx or tx.polled else tx.kick,
                    features=(rx or tx).features, port=port, qp=qp, queue=qp,
                    rx_shared=bool(rx and rx.shared), rx_epoch=rx.epoch if rx else 0,
                    log_call=self.ports[port].log_call))
        for port in sorted(self.taps):
            # Its counters sit where a ring pair's would: the stats stay one table.
            off = counter_offset(port, 0, self.config["rings_per_port"])
            counters = (np.frombuffer(self.stats_map, np.uint64, 2 * COUNTERS_PER_RING, off)
                        if self.stats_map is not None else np.zeros(2 * COUNTERS_PER_RING, np.uint64))
            where[(port, 0)] = len(pairs)
            hdr = self.tap_hdr.get(port, 0)
            pairs.append(dict(tap_fd=self.taps[port], tap_counters=counters, port=port, qp=0,
                              queue=0, tap_vnet_hdr=hdr, features=TAP_FEATURES if hdr else 0,
                              tap_write_only=port in self.tap_write_only))
        for port in sorted(self.vxlans):
            off = counter_offset(port, 0, self.config["rings_per_port"])
            counters = (np.frombuffer(self.stats_map, np.uint64, 2 * COUNTERS_PER_RING, off)
                        if self.stats_map is not None else np.zeros(2 * COUNTERS_PER_RING, np.uint64))
            where[(port, 0)] = len(pairs)
            pairs.append(dict(vxlan=self.vxlans[port][0], tap_counters=counters, port=port,
                              vxlan_write_only=port in self.vxlan_write_only,
                              qp=0, queue=0))
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

    def _capture(self, port, continuing=False):
        """The port's pcap files (vhu's rx and tx): see pcap_path. The engine
        appends records with write(2); we write the classic libpcap header
        (microsecond timestamps, DLT_EN10MB). Created with --pcap-mode
        (default 0600: guest traffic is not for every user), never through a
        symlink. A replacement worker continues its predecessor's files,
        cut after their last whole record (the predecessor may have died in
        the middle of one)."""
        if port not in self.captures:
            slots, fds = [], []
            snaplen = self.config.get("snaplen", 65535)
            mode = self.config.get("pcap_mode", 0o600)
            for direction in ("rx", "tx"):
                path = pcap_path(self.config["pcap_dir"], port, direction, self.index or 0,
                                 self.config.get("pcap_per_worker", False))
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                 mode)
                except OSError as exc:     # a symlink put there, a full disk: no capture
                    log.error("port %d: not capturing %s to %s: %s", port, direction, path,
                              exc.strerror)
                    slots.append(-1)
                    continue
                os.fchmod(fd, mode)       # an existing file keeps its mode otherwise
                end = pcap_whole_length(fd) if continuing else 0
                os.ftruncate(fd, end)
                os.lseek(fd, end, os.SEEK_SET)
                if end == 0:
                    os.write(fd, PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
                fds.append(fd)
                slots.append(self.engine.add_capture(fd, snaplen))
            self.captures[port] = (slots[0], slots[1], fds)
        return self.captures[port]

    def close(self):
        for port in list(self.ports):
            self.cmd_port_reset(port, fds=[])
        for port in list(self.taps):
            self.cmd_tap_close(port, fds=[])
        for port in list(self.vxlans):
            self.cmd_vxlan_close(port, fds=[])
        if self.engine is not None:
            self.engine.flush()
        for _, _, fds in self.captures.values():
            for fd in fds:
                _close(fd)
        self.captures = {}
        self.engine = None
        if self.stats_map is not None:
            try:
                self.stats_map.close()
            except BufferError:       # a ring still holds a view: the process is ending anyway
                pass


PCAP_HEADER = struct.Struct("<IHHiIII")


def pcap_whole_length(fd):
    """Bytes of a pcap file up to the end of its last whole record (0 if
    even its header is not whole)."""
    size = os.fstat(fd).st_size
    if size < PCAP_HEADER.size:
        return 0
    off = PCAP_HEADER.size
    while off + 16 <= size:
        incl = int.from_bytes(os.pread(fd, 4, off + 8), "little")
        if off + 16 + incl > size:
            break
        off += 16 + incl
    return off


def pcap_path(directory, port, direction, worker=0, per_worker=False):
    """DIR/<port>-<rx|tx>.pcap; with several workers each writes its own
    files, DIR/<port>-<rx|tx>-w<worker>.pcap (one writer per file, no locks).
    rx: frames vhu received from the port's front-end; tx: frames vhu sent it."""
    suffix = f"-w{worker}" if per_worker else ""
    return os.path.join(directory, f"{port}-{direction}{suffix}.pcap")


def worker_main(sock, config, stats_sock):
    """Entry point of a worker process (spawned: inherits nothing implicit).
    It has no index until the supervisor's first command (assign) gives it
    one: a spare worker waits, already started, to replace one that dies."""
    logging.basicConfig(level=config.get("log_level", "INFO"),
                        format="%(asctime)s vhu.worker %(levelname)s %(message)s")
    # The master decides when we stop (a signal to our process group must not
    # kill a worker mid-command); we exit when its control socket closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _, stats_fds, _, _ = socket.recv_fds(stats_sock, 16, 2)
    stats_sock.close()
    state = WorkerState(config, stats_fds[0] if stats_fds else -1)
    state.engine = Engine(app=config["app"], poll=config["poll"], batch=config["batch"],
                          ctrl_fd=sock.fileno(), frame=config.get("frame", b""),
                          stage=config.get("stage"), mac_ageing=config.get("mac_ageing", 300.0))
    if len(stats_fds) > 1:
        # The switch's MAC table, shared with the other workers (vhu.workers.shared).
        state.macs_map = mmap.mmap(stats_fds[1], 0)
        _close(stats_fds[1])
        state.engine.set_mac_memory(state.macs_map)
    state._rebind()
    sock.setblocking(False)
    try:
        while not state.quit:
            state.engine.run(0.5)
            state.engine.heartbeat()
            while not state.quit:
                try:
                    (seq, commands), fds = channel.recv(sock)
                except BlockingIOError:
                    break
                except channel.ChannelClosed:
                    return          # the master went away
                results = state.run_packet(commands, fds)
                state.engine.heartbeat()
                sock.setblocking(True)
                try:
                    channel.send(sock, channel.encode(seq, results))
                except OSError:
                    return          # the master went away
                sock.setblocking(False)
    finally:
        state.close()
        sock.close()
