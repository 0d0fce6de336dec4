"""The back-end's control loop: ports, supervised workers, statistics.

One asyncio event loop serves every socket (vhu.ports), the worker pool
(vhu.workers.supervisor), the stats timer and the control socket
(vhu.controlsock). Nothing in it blocks on a front-end or a worker; every
wait has a deadline. This is the layer between the sans-I/O protocol
(vhu.protocol) and the embeddable API (vhu.workers.Forwarder, which the CLI
vhu.master uses): it imports the former and is imported by the latter,
never the other way round.

Life cycle: open every port's socket (a path that cannot be served fails
before any worker is spawned), start the workers, serve until stop(), then
close the ports (socket files removed), write the last stats, stop the
workers. run() returns normally after stop(); any other end raises, and the
CLI exits non-zero.

Ports come and go while it runs (add_port, remove_port: the Forwarder's
methods and the control socket's commands are thin wrappers over these).
A port has an index, the lowest free one when it is added (counters and
MAC table entries of a removed port go with it); the shared counter memory
is sized for every index a master can have (vhu.config.MAX_PORTS).
"""
import asyncio
import functools
import logging
import os
import struct
import time

from vhu import stats as stats_mod
from vhu.config import MAX_PORTS
from vhu.controlsock import ControlServer
from vhu.netqueues import RECEIVEQ, ring_index
from vhu.portspecs import TapDevice, VhostUserPort, VxlanPort
from vhu.protocol.backend import negotiated_offloads
from vhu.ports import Port
from vhu.placement import Placement
from vhu.tap import TapPort
from vhu.vxlanport import VxlanPortState, same_port
from vhu.workers import shared
from vhu.workers.shared import LOCK_DEAD, MacMemory
from vhu.workers.supervisor import REPLACED, WorkerPool

log = logging.getLogger("vhu.master")

MAC_TABLE_TIMEOUT = 5.0


class ControlError(Exception):
    """A runtime control request that cannot be done; the message says why."""


def source_frame(size):
    """The source app's frame: broadcast Ethernet, IPv4/UDP, as testpmd txonly sends."""
    payload_len = size - 14 - 20 - 8
    eth = b"\xff" * 6 + bytes.fromhex("020000000001") + b"\x08\x00"
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + payload_len, 0, 0, 64, 17, 0,
                     bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2]))
    csum = sum(struct.unpack("!10H", ip))
    csum = (csum & 0xFFFF) + (csum >> 16)
    csum = (csum & 0xFFFF) + (csum >> 16)
    ip = ip[:10] + struct.pack("!H", ~csum & 0xFFFF) + ip[12:]
    udp = struct.pack("!HHHH", 9, 9, 8 + payload_len, 0)
    return eth + ip + udp + bytes(payload_len)


def initial_specs(config):
    """The ports a MasterConfig names, in index order: sockets, then TAPs,
    then VXLAN ports."""
    specs = [VhostUserPort(path, client=config.client or i in config.client_ports)
             for i, path in enumerate(config.sockets)]
    return specs + [TapDevice(name) for name in config.taps] + list(config.vxlans)


class ControlLoop:
    def __init__(self, config):
        self.config = config
        self.loop = None
        self.stats = None
        self.pool = None
        self.ports = {}               # index -> Port | TapPort | VxlanPortState
        self.vxlan_endpoints = {}     # (local, udp port) -> vhu.vxlanport.Endpoint
        self.control_server = None
        self.stopping = False
        self._stop_event = None
        self._last_snapshot = {}
        self._last_time = None
        self._last_load = {}          # worker index -> (pid, polling ticks, busy ticks) at the last report
        self._busy = {}               # worker index -> busy share between the last two reports
        # Who polls which queue pair; frames cross ports (and so workers)
        # with the switch, patch and pipeline stages.
        self.placement = Placement(config.worker_count,
                                   config.app in ("switch", "patch") or config.stage is not None)
        self.macs = None              # the switch's shared MAC table (vhu.workers.shared)

    # -- life cycle -------------------------------------------------------------

    async def run(self, started=None):
        """Serve until stop(); started() is called once the ports listen and
        the workers are starting (or with the exception that prevented it)."""
        c = self.config
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self.stopping:
            self._stop_event.set()
        self.stats = stats_mod.StatsMemory(MAX_PORTS, c.rings_per_port, c.worker_count)
        try:
            try:
                for index, spec in enumerate(initial_specs(c)):
                    self._open_port(index, spec)
                if c.control:
                    self.control_server = ControlServer(self, c.control)
                    await self.control_server.start()
                if c.app == "switch":
                    self.macs = MacMemory()
                self.pool = WorkerPool(c.worker_count, self._worker_config(), self.stats,
                                       cpus=c.cpus, replay=self._replay,
                                       on_fault=self._on_fault, on_error=self._on_error,
                                       macs=self.macs)
                self.pool.start()
                for port in list(self.ports.values()):
                    self._announce(port)
                    port.serve()
            except BaseException as exc:
                if started is not None:
                    started(exc)
                raise
            if started is not None:
                started(None)
            reporter = self.loop.create_task(self._report_every(c.stats_interval))
            try:
                await self._stop_event.wait()
            finally:
                reporter.cancel()
        finally:
            await self._shutdown()

    def _worker_config(self):
        c = self.config
        return dict(app=c.app, poll=c.poll, batch=c.batch, rings_per_port=c.rings_per_port,
                    frame=source_frame(c.pkt_size) if c.app == "source" else b"",
                    log_level=c.log_level, pcap_dir=c.pcap_dir, pcap_mode=c.pcap_mode,
                    pcap_per_worker=c.worker_count > 1, snaplen=c.snaplen,
                    mac_ageing=c.mac_ageing, stage=c.stage, stats_layout=tuple(self.stats.layout))

    def stop(self):
        """Ask the loop to stop; safe from any thread and from signal handlers."""
        self.stopping = True
        loop, event = self.loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:          # the loop is already gone
                pass

    async def _shutdown(self):
        self.stopping = True
        if self.control_server is not None:
            self.control_server.close()
        for p in list(self.ports.values()):
            try:
                p.close()
            except Exception:
                log.exception("port %d: close failed", p.index)
        if self.pool is not None:
            self.report()
            await self.pool.close()
        self.stats.close()
        if self.macs is not None:
            self.macs.close()

    # -- ports ----------------------------------------------------------------------

    def _open_port(self, index, spec):
        """Create and open (bind, or create the TAP) the port `spec` names at
        `index`; nothing is served before serve()."""
        if isinstance(spec, VhostUserPort):
            queues = self.config.queues if spec.queues is None else spec.queues
            if not 1 <= queues <= self.config.queues:
                raise ControlError(f"queues {queues}: this master offers 1..{self.config.queues} "
                                   f"queue pairs per port (--queues)")
            port = Port(self, index, spec.path, client=spec.client, queues=queues)
        elif isinstance(spec, TapDevice):
            port = TapPort(self, index, spec.name)
        elif isinstance(spec, VxlanPort):
            port = VxlanPortState(self, index, spec)
        else:
            raise ControlError(f"not a port: {spec!r}")
        port.spec = spec
        port.open()
        self.ports[index] = port
        return port

    def _announce(self, port):
        """Tell every worker the port exists (its capture files open, empty)."""
        for w in range(self.pool.count):
            self.pool.submit(w, "port_open", port.index, True, port=None)

    def find_port(self, ref):
        """A port by index (int, or digits) or by its socket path / TAP name."""
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            port = self.ports.get(int(ref))
            if port is None:
                raise ControlError(f"no port {ref}")
            return port
        for port in self.ports.values():
            if isinstance(port.spec, VhostUserPort) and \
                    os.path.abspath(port.spec.path) == os.path.abspath(ref):
                return port
            if isinstance(port.spec, TapDevice) and ref in (port.spec.name, port.path):
                return port
            if isinstance(port.spec, VxlanPort) and ref == port.path:
                return port
        raise ControlError(f"no port {ref!r}")

    async def add_port(self, spec):
        """A new port, served from now on (its front-end may connect when this
        returns); its description (describe_port)."""
        if self.stopping:
            raise ControlError("vhu is stopping")
        if self.config.app == "patch" and len(self.ports) >= 2:
            raise ControlError("--app patch joins exactly two ports; remove one first")
        for other in self.ports.values():
            if isinstance(spec, VhostUserPort) and isinstance(other.spec, VhostUserPort) and \
                    os.path.abspath(other.spec.path) == os.path.abspath(spec.path):
                raise ControlError(f"{spec.path} is port {other.index} already")
            if isinstance(spec, TapDevice) and isinstance(other.spec, TapDevice) and \
                    other.spec.name == spec.name:
                raise ControlError(f"TAP {spec.name} is port {other.index} already")
            if isinstance(spec, VxlanPort) and isinstance(other.spec, VxlanPort) and \
                    same_port(spec, other.spec):
                raise ControlError(f"vni {spec.vni} on {spec.local}:{spec.port} is port "
                                   f"{other.index} already")
        free = [i for i in range(MAX_PORTS) if i not in self.ports]
        if not free:
            raise ControlError(f"at most {MAX_PORTS} ports")
        index = free[0]
        self.stats.reset_port(index)          # what an earlier port at this index counted
        try:
            port = self._open_port(index, spec)
        except (OSError, ValueError) as exc:
            raise ControlError(str(exc)) from None
        self._announce(port)
        port.serve()
        log.info("port %d added: %r", index, spec)
        return self.describe_port(port)

    async def remove_port(self, ref):
        """Disconnect the port's front-end, stop its rings, release its fds and
        mappings, remove its socket file; nothing else pauses. What it was."""
        port = self.find_port(ref)
        info = self.describe_port(port)
        port.close()
        del self.ports[port.index]
        self._last_snapshot.pop(port.index, None)
        # Its captures complete, its MAC table entries forgotten, in every worker.
        futs = [self.pool.submit(w, "port_close", port.index, port=None)
                for w in range(self.pool.count)]
        self.pool.hurry()
        await asyncio.gather(*futs, return_exceptions=True)
        log.info("port %d removed: %r", port.index, port.spec)
        return info

    # -- asking -----------------------------------------------------------------

    def describe_port(self, port):
        kind = ("tap" if isinstance(port, TapPort) else
                "vxlan" if isinstance(port, VxlanPortState) else "vhost-user")
        out = {"port": port.index, "kind": kind, "socket": port.path, "connected": port.connected}
        if isinstance(port, VxlanPortState):
            out.update(queues=1, vxlan=port.describe(),
                       queue_pairs=[{"queue": 0, "worker": self.placement.lookup(port.index, 0)}])
            return out
        if isinstance(port, TapPort):
            out.update(queues=1, queue_pairs=[{"queue": 0, "worker": self.placement.lookup(port.index, 0)}])
            return out
        device = port.session.device if port.session is not None else None
        out.update(mode="client" if port.client else "server", queues=port.queues,
                   queue_pairs=[self._queue_pair(port.index, q)
                                for q in range(max(port.queue_pairs_in_use, 1))],
                   features=f"{device.acked_features:#x}" if device else None,
                   protocol_features=f"{device.acked_protocol_features:#x}" if device else None)
        return out

    def _queue_pair(self, port, q):
        """Who runs queue pair q of a port: `worker` polls its TX ring (None:
        not up yet), `rx_writers` are the workers that may deliver into its
        RX ring (locked when more than one)."""
        w = self.placement.lookup(port, q)
        writers = [] if w is None else self.placement.writers(port, ring_index(q, RECEIVEQ))
        # Who holds its RX ring's lock right now (a worker inside a batch;
        # "dead" until the master has reaped and released a dead holder).
        word = shared.lock_word(self.stats.array, port, ring_index(q, RECEIVEQ))
        holder = (None if word == 0 else "dead" if word == LOCK_DEAD else (word & 0xFFFF) - 1)
        return {"queue": q, "worker": w, "rx_writers": writers, "rx_lock_holder": holder}

    def describe(self):
        """What `vhu.ctl show` prints: the ports, the workers, how they poll."""
        return {"app": self.config.app, "poll": self.config.poll,
                "queues_offered": self.config.queues, "workers": self.workers(),
                "ports": [self.describe_port(p) for _, p in sorted(self.ports.items())]}

    def set_log_level(self, level):
        level = str(level).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ControlError(f"log level {level!r} is not DEBUG, INFO, WARNING or ERROR")
        logging.getLogger().setLevel(level)
        for w in range(self.pool.count):
            self.pool.submit(w, "log_level", level, port=None)
        log.warning("log level set to %s", level)
        return level

    async def mac_table(self):
        """The switch's learned stations: [{mac, port, age}] from every worker."""
        if self.config.app != "switch":
            raise ControlError(f"no MAC table: the app is {self.config.app}, not switch")
        futs = [self.pool.submit(w, "mac_table", port=None) for w in range(self.pool.count)]
        self.pool.hurry()
        done = await asyncio.wait_for(asyncio.gather(*futs, return_exceptions=True),
                                      MAC_TABLE_TIMEOUT)
        rows = {}
        for worker, entries in enumerate(done):
            if isinstance(entries, BaseException) or entries is REPLACED:
                continue
            for mac, port, age in entries:
                best = rows.get(mac)
                if best is None or age < best["age"]:
                    rows[mac] = {"mac": ":".join(f"{(mac >> s) & 0xFF:02x}"
                                                 for s in range(40, -8, -8)),
                                 "port": port, "age": round(age, 1), "worker": worker}
        # Behind a VXLAN port: which remote VTEP (the table of the port's
        # reader, the worker that polls it; its other workers only send).
        readers = {p.index: p.reader() for p in self.ports.values()
                   if isinstance(p, VxlanPortState) and p.connected}
        for worker in sorted(set(readers.values())):
            fut = self.pool.submit(worker, "vxlan_fdb", port=None)
            self.pool.hurry()
            try:
                fdb = await asyncio.wait_for(fut, MAC_TABLE_TIMEOUT)
            except (asyncio.TimeoutError, Exception):
                fdb = {}
            if not isinstance(fdb, dict):
                continue
            for port, entries in fdb.items():
                if readers.get(port) != worker:
                    continue
                for mac, remote, _age in entries:
                    row = rows.get(mac)
                    if row is not None and row["port"] == port:
                        row["remote"] = remote
        return sorted(rows.values(), key=lambda r: (r["port"], r["mac"]))

    # -- workers --------------------------------------------------------------

    def _replay(self, worker):
        cmds = []
        for _, p in sorted(self.ports.items()):
            cmds.append(("port_open", (p.index, False), [], None))
            cmds += p.replay(worker)
        return cmds

    def _on_fault(self, port_index, sig, addr):
        port = self.ports.get(port_index)
        if port is not None:
            port.memory_fault(sig, addr)

    def _on_error(self, source, name, message):
        source.command_failed(name, message)      # the connection (or TAP) it was for

    # -- statistics -----------------------------------------------------------

    async def _report_every(self, interval):
        while True:
            await asyncio.sleep(interval)
            self.report()

    def port_stats(self, only=None):
        snap = self.stats.snapshot()
        out = []
        for i, p in sorted(self.ports.items()):
            if only is not None and i != only:
                continue
            ps = stats_mod.port_stats(snap, i, p.queue_pairs_in_use, p.path, p.connected,
                                      functools.partial(self.placement.lookup, i),
                                      logging=getattr(p, "logging", False))
            ps["offloads"] = self._offloads(p)
            if isinstance(p, VxlanPortState):
                ps["vxlan"] = {**p.describe(), "remotes": p.remote_stats()}
            out.append(ps)
        return out

    @staticmethod
    def _offloads(port):
        """The offloads a port's front-end negotiated (names, as the spec's
        VIRTIO_NET_F_*); none while no front-end is connected. A TAP: what
        it does with IFF_VNET_HDR (vhu.tap). A VXLAN port takes none: what
        goes into it is finished and segmented first."""
        if isinstance(port, TapPort):
            return list(port.offloads)
        session = getattr(port, "session", None)
        if session is None:
            return []
        return negotiated_offloads(session.device.acked_features)

    def report(self):
        ports = self.port_stats()
        self._measure_load()
        now = time.monotonic()
        dt = now - self._last_time if self._last_time else 0
        for ps in ports:
            log.info("%s", stats_mod.rate_line(ps, self._last_snapshot.get(ps["port"]), dt))
        self._last_snapshot, self._last_time = {ps["port"]: ps for ps in ports}, now
        if self.config.stats_file:
            try:
                stats_mod.write_json(self.config.stats_file, ports, workers=self.workers())
            except OSError as exc:
                log.error("stats file %s: %s", self.config.stats_file, exc)

    def worker_pids(self):
        return self.pool.pids() if self.pool is not None else []

    def workers(self):
        """The workers as the stats file lists them: index, pid, how many
        times the worker of that index was replaced so far, how many
        command packets the current one was sent (control traffic it had to
        stop for), its loop's polling and busy ticks so far (its CPU's
        tick counter, vhu.workers poll_ticks.h; from 0 again in a
        replacement), and "busy": the share of its loop's time spent in
        rounds that moved frames between the last two reports (None before
        there are two)."""
        if self.pool is None:
            return []
        out = []
        for i, h in enumerate(self.pool.workers):
            poll, busy = self.stats.load(i)
            out.append({"index": i, "pid": h.pid, "replaced": self.pool.replaced[i],
                        "packets": h.packets, "poll_ticks": poll, "busy_ticks": busy,
                        "busy": self._busy.get(i)})
        return out

    def _measure_load(self):
        """Each worker's busy share since the last report (a new worker, or
        one whose loop has not run since, has none yet)."""
        if self.pool is None:
            return
        for i, h in enumerate(self.pool.workers):
            poll, busy = self.stats.load(i)
            last = self._last_load.get(i)
            if last is not None and last[0] == h.pid and poll > last[1]:
                self._busy[i] = round((busy - last[2]) / (poll - last[1]), 4)
            else:
                self._busy[i] = None
            self._last_load[i] = (h.pid, poll, busy)
