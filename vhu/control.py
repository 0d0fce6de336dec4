"""The back-end's control loop: ports, supervised workers, statistics.

One asyncio event loop serves every socket (vhu.ports), the worker pool
(vhu.workers.supervisor) and the stats timer. Nothing in it blocks on a
front-end or a worker; every wait has a deadline. This is the layer between
the sans-I/O protocol (vhu.protocol) and the embeddable API
(vhu.workers.Forwarder, which the CLI vhu.master uses): it imports the
former and is imported by the latter, never the other way round.

Life cycle: open every port's socket (a path that cannot be served fails
before any worker is spawned), start the workers, serve until stop(), then
close the ports (socket files removed), write the last stats, stop the
workers. run() returns normally after stop(); any other end raises, and the
CLI exits non-zero.
"""
import asyncio
import logging
import struct
import time

from vhu import stats as stats_mod
from vhu.ports import Port
from vhu.tap import TapPort
from vhu.workers.supervisor import WorkerPool

log = logging.getLogger("vhu.master")


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


class ControlLoop:
    def __init__(self, config):
        self.config = config
        self.loop = None
        self.stats = None
        self.pool = None
        self.ports = []
        self.stopping = False
        self._stop_event = None
        self._last_snapshot = None
        self._last_time = None

    # -- life cycle -------------------------------------------------------------

    async def run(self, started=None):
        """Serve until stop(); started() is called once the ports listen and
        the workers are starting (or with the exception that prevented it)."""
        c = self.config
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        if self.stopping:
            self._stop_event.set()
        self.stats = stats_mod.StatsMemory(len(c.sockets) + len(c.taps), c.rings_per_port,
                                           c.worker_count)
        try:
            try:
                for index, path in enumerate(c.sockets):
                    port = Port(self, index, path, client=c.client or index in c.client_ports)
                    self.ports.append(port)
                    port.open()
                for k, name in enumerate(c.taps):      # TAP ports follow the sockets
                    port = TapPort(self, len(c.sockets) + k, name)
                    self.ports.append(port)
                    port.open()
                self.pool = WorkerPool(c.worker_count, self._worker_config(), self.stats,
                                       cpus=c.cpus, replay=self._replay,
                                       on_fault=self._on_fault, on_error=self._on_error)
                self.pool.start()
                for port in self.ports:
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
        for p in self.ports:
            try:
                p.close()
            except Exception:
                log.exception("port %d: close failed", p.index)
        if self.pool is not None:
            self.report()
            await self.pool.close()
        self.stats.close()

    # -- workers --------------------------------------------------------------

    def _replay(self, worker):
        cmds = []
        for p in self.ports:
            cmds += p.replay(worker)
        return cmds

    def _on_fault(self, port_index, sig, addr):
        if 0 <= port_index < len(self.ports):
            self.ports[port_index].memory_fault(sig, addr)

    def _on_error(self, source, name, message):
        source.command_failed(name, message)      # the connection (or TAP) it was for

    # -- statistics -----------------------------------------------------------

    async def _report_every(self, interval):
        while True:
            await asyncio.sleep(interval)
            self.report()

    def port_stats(self):
        snap = self.stats.snapshot()
        return [stats_mod.port_stats(snap, i, p.queue_pairs_in_use, p.path, p.connected,
                                     self.config.worker_of)
                for i, p in enumerate(self.ports)]

    def report(self):
        ports = self.port_stats()
        now = time.monotonic()
        dt = now - self._last_time if self._last_time else 0
        for i, ps in enumerate(ports):
            before = self._last_snapshot[i] if self._last_snapshot else None
            log.info("%s", stats_mod.rate_line(ps, before, dt))
        self._last_snapshot, self._last_time = ports, now
        if self.config.stats_file:
            try:
                stats_mod.write_json(self.config.stats_file, ports, workers=self.workers())
            except OSError as exc:
                log.error("stats file %s: %s", self.config.stats_file, exc)

    def worker_pids(self):
        return self.pool.pids() if self.pool is not None else []

    def workers(self):
        """The workers as the stats file lists them: index, pid, and how many
        times the worker of that index was replaced so far."""
        if self.pool is None:
            return []
        return [{"index": i, "pid": pid, "replaced": self.pool.replaced[i]}
                for i, pid in enumerate(self.pool.pids())]
