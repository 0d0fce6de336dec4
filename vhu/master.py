"""vhu.master: the back-end's control process.

    python -m vhu.master --socket ./vhost.sock [--socket PATH ...] [--client]
        [--workers N] [--queues Q] [--app sink|echo|source|patch|switch|pcap]
        [--poll busy|epoll|adaptive] [--cpus LIST] [--stats-interval S]
        [--stats-file PATH] [--log-level LEVEL] [--pkt-size N] [--socket-mode 0600]
        [--tap NAME ...] [--pcap DIR] [--metrics-port PORT] [--mac-ageing S]

One event loop (selectors) serves every socket: it reads vhost-user
messages and their fds, runs them through the sans-I/O protocol layer
(vhu.protocol) and turns the resulting state transitions into commands for
the worker processes (vhu.workers.process), which own the rings. SIGINT and
SIGTERM stop workers, remove socket files, exit 0.
"""
import errno
import logging
import os
import selectors
import signal
import socket
import stat
import sys
import time

from vhu import stats as stats_mod
from vhu.config import MasterConfig, UsageError, parse_args
from vhu.ports import Port
from vhu.tap import TapPort
from vhu.workers.process import WorkerHandle

log = logging.getLogger("vhu.master")


def source_frame(size):
    """The source app's frame: broadcast Ethernet, IPv4/UDP, as testpmd txonly sends."""
    import struct
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


class Master:
    def __init__(self, config: MasterConfig):
        self.config = config
        self.selector = selectors.DefaultSelector()
        self.stats = stats_mod.StatsMemory(len(config.sockets) + len(config.taps),
                                           config.rings_per_port)
        self.workers = []
        self.ports = []
        self.stopping = False
        self._last_snapshot = None
        self._last_time = None
        self.started = False

    def start(self):
        c = self.config
        frame = source_frame(c.pkt_size) if c.app == "source" else b""
        # Sockets first: a path that cannot be served fails before any worker is spawned.
        for index, path in enumerate(c.sockets):
            port = Port(self, index, path)
            self.ports.append(port)
            port.open()
        for k, name in enumerate(c.taps):      # TAP ports follow the sockets
            port = TapPort(self, len(c.sockets) + k, name)
            self.ports.append(port)
            port.open()
        for i in range(c.worker_count):
            cpu = c.cpus[i % len(c.cpus)] if c.cpus else None
            wconf = dict(app=c.app, poll=c.poll, batch=c.batch, rings_per_port=c.rings_per_port,
                         cpu=cpu, frame=frame, log_level=c.log_level, pcap_dir=c.pcap_dir,
                         pcap_per_worker=c.worker_count > 1, snaplen=c.snaplen,
                         mac_ageing=c.mac_ageing, stage=c.stage)
            self.workers.append(WorkerHandle(i, wconf, self.stats.dup_fd()))
        self.started = True

    def worker_for_ring(self, ring_index):
        return self.workers[self.config.worker_of(ring_index // 2)]

    def run(self):
        interval = self.config.stats_interval
        next_stats = time.monotonic() + interval
        while not self.stopping:
            timeout = max(0.0, min(next_stats - time.monotonic(),
                                   *(p.timer_due() for p in self.ports)))
            for key, events in self.selector.select(timeout):
                key.data(events)
            now = time.monotonic()
            for p in self.ports:
                p.on_timer(now)
            for w in self.workers:
                if not w.process.is_alive():
                    log.error("worker %d died (exit code %s); stopping", w.index, w.process.exitcode)
                    self.stopping = True
            if now >= next_stats:
                self.report()
                next_stats = now + interval

    def report(self, final=False):
        snap = self.stats.snapshot()
        now = time.monotonic()
        ports = [stats_mod.port_stats(snap, i, self.config.queues, p.path, p.connected,
                                       self.config.worker_of)
                 for i, p in enumerate(self.ports)]
        dt = now - self._last_time if self._last_time else 0
        for i, ps in enumerate(ports):
            before = self._last_snapshot[i] if self._last_snapshot else None
            log.info("%s", stats_mod.rate_line(ps, before, dt))
        self._last_snapshot, self._last_time = ports, now
        if self.config.stats_file:
            try:
                stats_mod.write_json(self.config.stats_file, ports)
            except OSError as exc:
                log.error("stats file %s: %s", self.config.stats_file, exc)

    def stop(self, *_):
        self.stopping = True

    def close(self):
        for p in self.ports:
            p.close()
        if self.started:                  # a failed start has nothing to report
            self.report(final=True)
        for w in self.workers:
            w.stop()
        self.stats.close()
        self.selector.close()


def main(argv=None):
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"vhu.master: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level, stream=sys.stdout,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # The CLI is a thin user of the embeddable API: one Forwarder, served here.
    from vhu.workers.forwarder import Forwarder
    fw = Forwarder(config=config)
    signal.signal(signal.SIGINT, lambda *_: fw.stop())
    signal.signal(signal.SIGTERM, lambda *_: fw.stop())
    try:
        fw.run()
    except OSError as exc:
        log.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
