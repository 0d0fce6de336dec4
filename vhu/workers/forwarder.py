"""vhu.workers.Forwarder: vhu embedded in your own program.

    from vhu.workers import Forwarder, DROP, APP

    def no_ipv6(batch):                       # runs in the worker, once per batch
        return np.where(batch.ethertype == 0x86DD, DROP, APP)

    with Forwarder(["a.sock", "b.sock"], pipeline=[no_ipv6, "patch"]) as fw:
        time.sleep(10)
        print(fw.stats())

A Forwarder runs the machinery of ``python -m vhu.master`` (which is itself a
thin user of this class): the master event loop serving the vhost-user
sockets, and worker processes owning the rings. start() runs the event loop
in a background thread of this process; run() runs it in the calling thread
until stop() (the CLI's way, with SIGINT/SIGTERM calling stop()).

The pipeline is a list of stages:

* Python stages: callables ``stage(batch) -> verdicts | None``, called in the
  worker process once per batch of frames (never once per frame). They are
  pickled into the spawned workers, so they must be importable by module
  path (module-level functions, instances of module-level classes). A class
  (with a no-argument constructor) is instantiated in each worker before its
  first batch, so per-worker state can live in the instance.
* at most one built-in app, last: "switch", "patch", "echo", "sink" or
  "pcap" (capture sink; needs pcap_dir). Frames whose verdict is APP go to
  it; without one, APP frames are dropped (a sink). Built-in apps are
  compiled: a frame they forward is copied once, guest buffer to guest
  buffer, with no Python object made for it (the switch first copies the
  header bytes it decides on out of guest memory, and sends that copy).

Verdicts: a numpy integer array, one per frame: DROP (-1), APP (-2: the
built-in app decides) or an output port index (the frame goes into that
port's queue pair with the same index as the one it came from). None means
APP for every frame. Several Python stages see the same batch in turn; each
one's verdicts replace ``batch.verdicts`` (which starts as all APP).

Cost: a Python stage costs one Python call per batch plus whatever it does;
with a batch of 32 that is a few microseconds per batch, so expect well under
a million frames per second per worker with a Python stage, against several
million for the compiled apps alone. Raise ``batch`` to amortise it.

A stage sees private copies: every frame of a batch is copied out of guest
memory before the first stage runs, and what the stages leave in those
copies is what gets sent. A guest that rewrites its buffer while a stage
looks at it changes nothing (a filter cannot be bypassed that way).

A stage that raises: the traceback is logged (at most once a second per
worker, with a count of failures in between), the frames of that batch are
dropped and counted as drop_stage_error, and the worker keeps running. A
stage that takes longer than a second on one batch is presumed hung: its
worker is replaced (vhu.workers.supervisor).
"""
import asyncio
import logging
import os
import threading

import numpy as np

from vhu.config import APPS, DEFAULT_QUEUES, MAX_PORTS, POLL_MODES, MasterConfig
from vhu.control import ControlLoop
from vhu.portspecs import TapDevice, VhostUserPort, VxlanPort  # noqa: F401  (part of this API)
from vhu.protocol.backend import MAX_QUEUE_PAIRS
from vhu.workers._engine import VERDICT_APP, VERDICT_DROP

log = logging.getLogger("vhu.forwarder")

DROP = VERDICT_DROP
APP = VERDICT_APP
BUILTIN = ("switch", "patch", "echo", "sink", "pcap")


class Batch:
    """One batch of frames as a stage sees it: views of private copies.

    meta     numpy structured array (vhu.workers._engine.META_DTYPE), one row
             per frame: port, queue, length, buf, offset, and ethertype,
             dst_mac, src_mac (read in C when the batch was built; a stage
             that rewrites a MAC does not update them), and the frame's
             virtio-net header as vhu checked it: flags (1: NEEDS_CSUM, a
             partial checksum), gso_type (1 TCPV4, 4 TCPV6, | 0x80 ECN; 0:
             not a large frame), gso_size (the MSS), csum_start, csum_offset
             (all 0 for a frame that asks for no offload).
    bufs     uint8 numpy arrays; frame i is
             ``bufs[meta["buf"][i]][meta["offset"][i]:][:meta["length"][i]]``,
             the Ethernet frame without the virtio-net header. Each frame was
             copied out of guest memory into a per-worker scratch area before
             the stages run, and is forwarded from there: writing to the
             views edits what is sent, and the guest can no longer change
             what a stage decided on.
    verdicts int64 array, DROP / APP / port per frame.

    Views are valid only during the call: do not keep them.

    Offloaded frames (flags & 1): a frame can be a TCP segment up to 64 KiB
    (gso_type != 0, cut into gso_size segments by vhu or the receiver) whose
    TCP/UDP checksum is partial: the field at csum_start + csum_offset holds
    the pseudo-header sum, to be finished over csum_start..end. A stage that
    rewrites bytes the pseudo-header covers (IP addresses; the length is
    fixed) must adjust that field as it would a full checksum (RFC 1624),
    or the finished checksum is wrong; bytes after csum_start (ports, the
    payload) need no care, they are summed when the checksum is finished.
    vhu's segmentation recomputes every checksum, so edits of a large
    frame's headers are carried into each segment.
    """

    __slots__ = ("meta", "bufs", "verdicts")

    def __init__(self, meta, bufs):
        self.meta = meta
        self.bufs = bufs
        self.verdicts = np.full(len(meta), APP, dtype=np.int64)

    def __len__(self):
        return len(self.meta)

    @property
    def port(self):
        return self.meta["port"]

    @property
    def queue(self):
        return self.meta["queue"]

    @property
    def length(self):
        return self.meta["length"]

    def frame(self, i):
        """Frame i as a writable uint8 view."""
        m = self.meta[i]
        return self.bufs[m["buf"]][m["offset"]:m["offset"] + m["length"]]

    def bytes_at(self, offset, size):
        """Bytes [offset, offset+size) of every frame as an (n, size) uint8
        array (a copy; 0 where a frame is shorter), vectorised per buffer."""
        n = len(self.meta)
        lens, bi = self.meta["length"], self.meta["buf"]
        if n and (bi == bi[0]).all() and (lens >= offset + size).all():
            # The common case, one buffer and no short frame: one fancy index.
            idx = self.meta["offset"].astype(np.intp)
            idx += offset
            return self.bufs[bi[0]][idx[:, None] + np.arange(size)]
        out = np.zeros((n, size), dtype=np.uint8)
        cols = np.arange(size, dtype=np.uint64)
        inside = (self.meta["length"][:, None].astype(np.uint64) >
                  np.uint64(offset) + cols[None, :])
        for b in np.unique(self.meta["buf"]):
            rows = np.nonzero(self.meta["buf"] == b)[0]
            idx = self.meta["offset"][rows, None] + np.uint64(offset) + cols[None, :]
            ok = inside[rows]
            idx = np.where(ok, idx, 0).astype(np.intp)
            out[rows] = np.where(ok, self.bufs[b][idx], 0)
        return out

    # Read by the engine in C while it builds meta (0 for frames under 14 bytes).

    @property
    def ethertype(self):
        """EtherType (or 802.3 length) of every frame, as uint16."""
        return self.meta["ethertype"]

    @property
    def dst_mac(self):
        """Destination MAC of every frame as a uint64 (0x525400123456)."""
        return self.meta["dst_mac"]

    @property
    def src_mac(self):
        return self.meta["src_mac"]

    @property
    def needs_csum(self):
        """True where the frame's L4 checksum is partial (virtio NEEDS_CSUM)."""
        return (self.meta["flags"] & 1).astype(bool)

    @property
    def gso_type(self):
        """0, or the large-frame type (1 TCPV4, 4 TCPV6; | 0x80 ECN)."""
        return self.meta["gso_type"]

    @property
    def gso_size(self):
        return self.meta["gso_size"]


class StageRunner:
    """What the worker's engine calls once per batch: runs the Python stages
    in order and hands back their verdicts. Pickled into each worker."""

    def __init__(self, stages):
        self.stages = list(stages)
        self._live = None

    def __getstate__(self):
        return {"stages": self.stages, "_live": None}

    def __call__(self, meta, bufs):
        if self._live is None:
            # Classes are instantiated here, in the worker, on the first
            # batch: per-worker state (counters, files) lives in the instance.
            self._live = [s() if isinstance(s, type) else s for s in self.stages]
        batch = Batch(meta, bufs)
        for stage in self._live:
            out = stage(batch)
            if out is not None:
                out = np.asarray(out)
                if out.shape != (len(batch),):
                    raise ValueError(f"{stage!r} returned verdicts of shape {out.shape} "
                                     f"for {len(batch)} frames")
                batch.verdicts = out.astype(np.int64, copy=False)
        return batch.verdicts


def _split_pipeline(pipeline):
    stages, app = [], None
    for i, s in enumerate(pipeline):
        if isinstance(s, str):
            if s not in BUILTIN:
                raise ValueError(f"unknown built-in stage {s!r} (have {', '.join(BUILTIN)})")
            if i != len(pipeline) - 1:
                raise ValueError(f"built-in stage {s!r} must be the last of the pipeline")
            app = s
        elif callable(s):
            stages.append(s)
        else:
            raise TypeError(f"pipeline stage {s!r} is neither a built-in name nor callable")
    return stages, app or "sink"


class Forwarder:
    """Ports, workers, poll mode and a pipeline; start(), stop(), stats().

    ports      socket paths (server mode), VhostUserPort objects, then TapDevice ones,
               then VxlanPort ones (VxlanPort(vni=42, local=..., remotes=[...], port=4789))
    workers    worker processes; every (port, queue pair) is given to one
               when it comes up, round-robin over all ports' queue pairs
               (vhu.placement), so N single-queue VMs use N workers
    queues     the most queue pairs a port offers (default 8: those a front-end
               sets up are served)
    poll       "busy", "epoll" or "adaptive"
    pipeline   see the module documentation; default ["sink"]
    batch      frames per ring per round (1..256), also the stage's batch size
    pcap_dir   capture every port and direction (see vhu.workers.process.pcap_path)
    pcap_mode  mode of the capture files (default 0o600)
    control    a control socket path for python -m vhu.ctl (default: none)
    offloads   offer checksum and TSO offloads to the front-ends (default True)
    cpus       pin worker i to cpus[i % len(cpus)]
    stats_file, stats_interval, metrics_port, log_level: as the CLI's flags
    """

    def __init__(self, ports=(), *, workers=1, queues=DEFAULT_QUEUES, poll="adaptive", pipeline=("sink",),
                 batch=32, pcap_dir=None, pcap_mode=0o600, snaplen=65535, mac_ageing=300.0, cpus=(),
                 stats_file=None, stats_interval=1.0, metrics_port=None,
                 metrics_addr="127.0.0.1", log_level="INFO", socket_mode=0o600,
                 pkt_size=64, control=None, offloads=True, config=None):
        if config is not None:          # the CLI: an already validated MasterConfig
            self.config = config
        else:
            self.config = self._config(ports, workers, queues, poll, pipeline, batch, pcap_dir,
                                       pcap_mode, control, snaplen, mac_ageing, cpus, stats_file, stats_interval,
                                       metrics_port, metrics_addr, log_level, socket_mode,
                                       pkt_size, offloads)
        self.control = None
        self.metrics = None
        self.error = None             # what ended a start()ed loop, if not stop()
        self._thread = None
        self._lock = threading.Lock()

    @staticmethod
    def _config(ports, workers, queues, poll, pipeline, batch, pcap_dir, pcap_mode, control,
                snaplen,
                mac_ageing,
                cpus, stats_file, stats_interval, metrics_port, metrics_addr, log_level,
                socket_mode, pkt_size, offloads=True):
        ports = [p if isinstance(p, (VhostUserPort, TapDevice, VxlanPort)) else VhostUserPort(p)
                 for p in ports]
        vxlans = tuple(p for p in ports if isinstance(p, VxlanPort))
        if any(isinstance(p, VxlanPort) for p in ports[:len(ports) - len(vxlans)]):
            raise ValueError("list VXLAN ports last (after the vhost-user ports and TAPs)")
        ports = ports[:len(ports) - len(vxlans)]
        taps = [p.name for p in ports if isinstance(p, TapDevice)]
        if any(isinstance(p, TapDevice) for p in ports[:len(ports) - len(taps)]):
            raise ValueError("list TAP devices after the vhost-user ports")
        ports = ports[:len(ports) - len(taps)]
        for i, v in enumerate(vxlans):
            if any((v.vni, v.local, v.port) == (w.vni, w.local, w.port) for w in vxlans[:i]):
                raise ValueError(f"VXLAN vni {v.vni} on {v.local}:{v.port} twice")
        if not ports:
            raise ValueError("a Forwarder needs at least one vhost-user port")
        if len(set(taps)) != len(taps):
            raise ValueError("the same TAP device twice")
        paths = [os.path.abspath(p.path) for p in ports]
        if len(set(paths)) != len(paths):
            raise ValueError("the same socket path twice")
        if len(ports) + len(taps) + len(vxlans) > MAX_PORTS:
            raise ValueError(f"at most {MAX_PORTS} ports")
        stages, app = _split_pipeline(list(pipeline))
        if app == "patch" and len(ports) + len(taps) + len(vxlans) != 2:
            raise ValueError("patch needs exactly two ports")
        if app == "pcap" and not pcap_dir:
            raise ValueError("the pcap stage needs pcap_dir")
        if poll not in POLL_MODES:
            raise ValueError(f"poll must be one of {POLL_MODES}")
        if workers < 1 or not 1 <= queues <= MAX_QUEUE_PAIRS:
            raise ValueError(f"workers >= 1 and queues 1..{MAX_QUEUE_PAIRS}")
        if not 1 <= batch <= 256:
            raise ValueError("batch must be 1..256")
        if pcap_dir is not None and not os.path.isdir(pcap_dir):
            raise ValueError(f"pcap_dir {pcap_dir!r} is not a directory")
        assert app in APPS
        clients = tuple(i for i, p in enumerate(ports) if p.client)
        return MasterConfig(
            sockets=tuple(p.path for p in ports), client=len(clients) == len(ports),
            client_ports=clients, workers=workers, queues=queues, app=app, poll=poll,
            cpus=tuple(cpus), stats_interval=stats_interval, stats_file=stats_file,
            log_level=log_level, pkt_size=pkt_size, socket_mode=socket_mode, batch=batch,
            pcap_dir=os.fspath(pcap_dir) if pcap_dir else None, pcap_mode=pcap_mode,
            control=os.fspath(control) if control else None,
            snaplen=snaplen,
            mac_ageing=mac_ageing, metrics_port=metrics_port, metrics_addr=metrics_addr,
            stage=StageRunner(stages) if stages else None, taps=tuple(taps),
            offloads=bool(offloads), vxlans=vxlans)

    # -- life cycle -----------------------------------------------------------

    def _metrics_on(self):
        if self.config.metrics_port is not None:
            from vhu.metrics import MetricsServer
            self.metrics = MetricsServer(self, self.config.metrics_port, self.config.metrics_addr)
            log.info("metrics: http://%s:%d/metrics", self.config.metrics_addr, self.metrics.port)

    def _metrics_off(self):
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    def start(self):
        """Open the sockets, spawn the workers and serve in a background
        thread; returns once the ports listen (or raises why they cannot)."""
        with self._lock:
            if self.control is not None:
                raise RuntimeError("Forwarder already started")
            self.control = ControlLoop(self.config)
            started = threading.Event()
            failure = []

            def on_started(exc):
                failure.append(exc)
                started.set()

            def serve():
                try:
                    asyncio.run(self.control.run(started=on_started))
                except BaseException as exc:          # reported to start() or logged
                    if not started.is_set():
                        on_started(exc)
                    elif not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                        log.exception("vhu event loop failed")
                    self.error = exc
            self._thread = threading.Thread(target=serve, name="vhu-control", daemon=True)
            self._thread.start()
            started.wait()
            if failure and failure[0] is not None:
                self._thread.join()
                self._thread, self.control = None, None
                raise failure[0]
            try:
                self._metrics_on()
            except BaseException:
                self.stop()
                raise
        return self

    def run(self):
        """Serve in the calling thread until stop() (e.g. from a signal
        handler). Returns after stop(); raises if the loop ended for an error."""
        with self._lock:
            if self.control is not None:
                raise RuntimeError("Forwarder already started")
            self.control = ControlLoop(self.config)

        def on_started(exc):
            if exc is None:
                self._metrics_on()
        try:
            asyncio.run(self.control.run(started=on_started))
        finally:
            self._metrics_off()
            self.control = None

    def stop(self):
        """Stop serving: close connections, stop workers, remove socket files.
        Safe from a signal handler (run()) and from any thread (start())."""
        control = self.control
        if control is None:
            return
        control.stop()
        if self._thread is not None and threading.current_thread() is not self._thread:
            self._thread.join()
            self._thread = None
            self._metrics_off()
            self.control = None

    @property
    def running(self):
        return self.control is not None and not self.control.stopping

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def worker_pids(self):
        """The worker processes' pids (they change when a worker is replaced)."""
        return self.control.worker_pids() if self.control is not None else []

    # -- ports at runtime ---------------------------------------------------------

    def _in_loop(self, make, timeout=30.0):
        """Run a control-loop coroutine from this thread; its result."""
        control = self._serving()
        if threading.current_thread() is self._thread or control.loop is None:
            raise RuntimeError("call from another thread than the Forwarder's own loop")
        future = asyncio.run_coroutine_threadsafe(make(control), control.loop)
        return future.result(timeout)

    def add_port(self, port, *, client=False, queues=None):
        """Add a port while serving: a socket path (or VhostUserPort) or a
        TapDevice. Its front-end may connect when this returns; its
        description (as in ports()). Raises vhu.control.ControlError."""
        if not isinstance(port, (VhostUserPort, TapDevice, VxlanPort)):
            port = VhostUserPort(port, client=client, queues=queues)
        return self._in_loop(lambda control: control.add_port(port))

    def remove_port(self, port):
        """Remove a port (index, socket path or TAP name): its front-end is
        disconnected, its rings stop, its fds and mappings are released, its
        socket file removed; nothing else pauses. What it was."""
        return self._in_loop(lambda control: control.remove_port(port))

    def ports(self):
        """Every port: index, kind, socket, connection, negotiated features,
        queue pairs and the worker of each."""
        async def describe(control):
            return control.describe()["ports"]
        return self._in_loop(describe)

    # -- statistics -----------------------------------------------------------

    def _serving(self):
        control = self.control
        if control is None or control.stats is None or control.stopping:
            raise RuntimeError("Forwarder not running")
        return control

    def snapshot(self):
        """The raw counters: uint64 array [port, ring, counter] (COUNTER_NAMES)."""
        return self._serving().stats.snapshot()

    def stats(self):
        """Per-port statistics as in the JSON stats file (vhu.stats.port_stats)."""
        return self._serving().port_stats()

    def workers(self):
        """The workers as the JSON stats file lists them (pid, replacements,
        command packets, polling and busy ticks, busy share)."""
        return self._serving().workers()
