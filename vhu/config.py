"""The master's command line: parse, validate into a frozen config, nothing else.

Kept free of sockets and processes so it is unit-tested on its own.
"""
import argparse
import os
from dataclasses import dataclass

from vhu import vxlan
from vhu.protocol.backend import MAX_QUEUE_PAIRS
from vhu.workers._engine import MAX_PORT_INDEX, MAX_QUEUE_INDEX

# The worker engine's tables bound what a master may serve.
assert MAX_QUEUE_PAIRS <= MAX_QUEUE_INDEX
MAX_PORTS = MAX_PORT_INDEX
# Queue pairs a port offers unless told otherwise: what a front-end sets up
# (DPDK queues=, QEMU's guest one per CPU) is served, up to this.
DEFAULT_QUEUES = 8

APPS = ("sink", "echo", "source", "patch", "switch", "pcap")
PCAP_BESIDE = ("patch", "switch", "pcap")     # apps --pcap DIR may tap
POLL_MODES = ("busy", "epoll", "adaptive")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class UsageError(Exception):
    """A bad command line; the message is one line for the user."""


@dataclass(frozen=True)
class MasterConfig:
    sockets: tuple
    client: bool = False
    workers: int = 1
    queues: int = DEFAULT_QUEUES  # the most queue pairs a port offers (GET_QUEUE_NUM)
    app: str = "sink"
    poll: str = "adaptive"
    cpus: tuple = ()
    stats_interval: float = 1.0
    stats_file: str | None = None
    log_level: str = "INFO"
    pkt_size: int = 64
    socket_mode: int = 0o600
    batch: int = 32
    pcap_dir: str | None = None   # capture every port, both directions (vhu.workers.process.pcap_path)
    pcap_mode: int = 0o600        # mode of the capture files (guest traffic: not for every user)
    snaplen: int = 65535
    mac_ageing: float = 300.0     # switch: seconds a learned MAC stays valid
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    stage: object = None          # a Forwarder pipeline's Python stages (vhu.workers.forwarder)
    client_ports: tuple = ()      # ports in client mode when not all are (--client)
    taps: tuple = ()              # TAP device names: ports len(sockets), len(sockets) + 1, ...
    control: str | None = None    # the control socket (vhu.controlsock), None: none
    offloads: bool = True         # offer checksum/TSO offloads (vhu.protocol.backend.OFFLOAD_FEATURES)
    vxlans: tuple = ()            # vhu.vxlan.VxlanPort specs: the ports after the TAPs

    @property
    def rings_per_port(self):
        return 2 * self.queues

    @property
    def worker_count(self):
        # Every worker gets queue pairs of any port (vhu.placement), so
        # single-queue ports use them all.
        return self.workers


def parse_cpus(text):
    """'0,2-3' -> (0, 2, 3)."""
    cpus = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UsageError(f"--cpus: {text!r} is not a CPU list like 0,2-3")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    if not cpus:
        raise UsageError("--cpus: empty CPU list")
    available = os.sched_getaffinity(0)
    missing = sorted(set(cpus) - available)
    if missing:
        raise UsageError(f"--cpus: CPU {missing[0]} is not available (have {sorted(available)})")
    return tuple(cpus)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = _Parser(prog="python -m vhu.master",
                description="vhost-user back-end: serve virtio-net devices to QEMU and DPDK front-ends")
    p.add_argument("--socket", action="append", required=True, metavar="PATH",
                   help="vhost-user socket path; repeat for several ports")
    p.add_argument("--client", action="store_true",
                   help="connect to listening front-ends (QEMU server=on, virtio-user server=1)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes (cap)")
    p.add_argument("--queues", type=int, default=DEFAULT_QUEUES, metavar="Q",
                   help="the most queue pairs a port offers (GET_QUEUE_NUM); front-ends use as many as they set up")
    p.add_argument("--app", default="sink", help=f"one of {', '.join(APPS)}")
    p.add_argument("--poll", default="adaptive", help=f"one of {', '.join(POLL_MODES)}")
    p.add_argument("--cpus", default=None, metavar="LIST", help="pin worker i to the i-th CPU of LIST")
    p.add_argument("--stats-interval", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--stats-file", default=None, metavar="PATH", help="JSON stats, rewritten each interval")
    p.add_argument("--log-level", default="INFO", metavar="LEVEL")
    p.add_argument("--pkt-size", type=int, default=64, metavar="N", help="frame size for --app source")
    p.add_argument("--socket-mode", default="0600", metavar="OCTAL", help="mode of created socket files")
    p.add_argument("--batch", type=int, default=32, metavar="N", help="chains per ring per round")
    p.add_argument("--tap", action="append", default=[], metavar="NAME",
                   help="a TAP device as a port (after the sockets); repeat for several")
    p.add_argument("--vxlan", action="append", default=[],
                   metavar="vni=N,local=IP,remote=IP[,remote=IP...][,port=4789]",
                   help="a VXLAN tunnel endpoint as a port (after the TAPs); repeat for "
                        "several, one per VNI")
    p.add_argument("--pcap", default=None, metavar="DIR",
                   help="capture each port and direction to DIR/<port>-<rx|tx>.pcap "
                        "(--app pcap, or beside --app patch|switch)")
    p.add_argument("--pcap-mode", default="0600", metavar="OCTAL",
                   help="mode of created capture files")
    p.add_argument("--snaplen", type=int, default=65535, metavar="N", help="pcap: bytes kept per frame")
    p.add_argument("--mac-ageing", type=float, default=300.0, metavar="SECONDS",
                   help="switch: forget a MAC address not seen for this long")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this TCP port (0: any free port)")
    p.add_argument("--metrics-addr", default="127.0.0.1", metavar="ADDR",
                   help="address the metrics endpoint listens on")
    p.add_argument("--control", default=None, metavar="PATH",
                   help="control socket for python -m vhu.ctl (default: the first socket's "
                        "path + .ctl; 'none' for no control socket)")
    p.add_argument("--offloads", default="on", metavar="on|off",
                   help="offer virtio-net checksum and TSO offloads (default on; off: "
                        "every guest checksums and segments itself)")
    return p


def default_control_path(first_socket):
    """Beside the first socket: <socket>.ctl."""
    return f"{first_socket}.ctl"


def _octal_mode(flag, text):
    try:
        mode = int(text, 8)
    except ValueError:
        raise UsageError(f"{flag}: {text!r} is not an octal mode") from None
    if not 0 <= mode <= 0o777:
        raise UsageError(f"{flag} must be 000..777")
    return mode


def parse_args(argv):
    a = build_parser().parse_args(argv)
    if a.app not in APPS:
        raise UsageError(f"--app: {a.app!r} is not one of {', '.join(APPS)}")
    if a.poll not in POLL_MODES:
        raise UsageError(f"--poll: {a.poll!r} is not one of {', '.join(POLL_MODES)}")
    if a.workers < 1:
        raise UsageError("--workers must be at least 1")
    if not 1 <= a.queues <= MAX_QUEUE_PAIRS:
        raise UsageError(f"--queues must be 1..{MAX_QUEUE_PAIRS}")
    vxlans = parse_vxlans(a.vxlan)
    if len(a.socket) + len(a.tap) + len(vxlans) > MAX_PORTS:
        raise UsageError(f"at most {MAX_PORTS} ports (--socket, --tap, --vxlan)")
    if a.app == "patch" and len(a.socket) + len(a.tap) + len(vxlans) != 2:
        raise UsageError("--app patch needs exactly two ports (--socket, --tap, --vxlan)")
    if len(set(a.tap)) != len(a.tap) or any(not 0 < len(t.encode()) < 16 or "/" in t for t in a.tap):
        raise UsageError("--tap: names must be distinct interface names (1..15 bytes)")
    if a.app == "pcap" and not a.pcap:
        raise UsageError("--app pcap needs --pcap DIR")
    if a.pcap and a.app not in PCAP_BESIDE:
        raise UsageError(f"--pcap works with --app {'|'.join(PCAP_BESIDE)}, not {a.app}")
    if a.pcap and not os.path.isdir(a.pcap):
        raise UsageError(f"--pcap: {a.pcap!r} is not a directory")
    if not 14 <= a.snaplen <= 65535:
        raise UsageError("--snaplen must be 14..65535")
    if not a.mac_ageing > 0:
        raise UsageError("--mac-ageing must be positive")
    if a.metrics_port is not None and not 0 <= a.metrics_port <= 65535:
        raise UsageError("--metrics-port must be 0..65535")
    if len(set(os.path.abspath(s) for s in a.socket)) != len(a.socket):
        raise UsageError("--socket: the same path twice")
    if a.stats_interval <= 0:
        raise UsageError("--stats-interval must be positive")
    if not 60 <= a.pkt_size <= 9000:
        raise UsageError("--pkt-size must be 60..9000")
    if not 1 <= a.batch <= 256:
        raise UsageError("--batch must be 1..256")
    if a.offloads not in ("on", "off"):
        raise UsageError(f"--offloads: {a.offloads!r} is not on or off")
    level = a.log_level.upper()
    if level not in LOG_LEVELS:
        raise UsageError(f"--log-level: {a.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    mode = _octal_mode("--socket-mode", a.socket_mode)
    pcap_mode = _octal_mode("--pcap-mode", a.pcap_mode)
    cpus = parse_cpus(a.cpus) if a.cpus is not None else ()
    control = default_control_path(a.socket[0]) if a.control is None else a.control
    if control == "none":
        control = None
    elif control is not None and os.path.abspath(control) in {os.path.abspath(s) for s in a.socket}:
        raise UsageError("--control: the path of a --socket")
    return MasterConfig(sockets=tuple(a.socket), client=a.client, workers=a.workers,
                        queues=a.queues, app=a.app, poll=a.poll, cpus=cpus,
                        stats_interval=a.stats_interval, stats_file=a.stats_file,
                        log_level=level, pkt_size=a.pkt_size, socket_mode=mode, batch=a.batch,
                        pcap_dir=a.pcap, pcap_mode=pcap_mode, snaplen=a.snaplen,
                        mac_ageing=a.mac_ageing,
                        metrics_port=a.metrics_port, metrics_addr=a.metrics_addr,
                        taps=tuple(a.tap), control=control, offloads=a.offloads == "on",
                        vxlans=vxlans)


def parse_vxlans(texts):
    """--vxlan specs -> VxlanPort tuple; a VNI once per local address and UDP port."""
    specs = []
    for text in texts:
        try:
            spec = vxlan.parse_spec(text)
        except vxlan.VxlanError as exc:
            raise UsageError(f"--vxlan {text}: {exc}") from None
        for other in specs:
            if (other.vni, other.local, other.port) == (spec.vni, spec.local, spec.port):
                raise UsageError(f"--vxlan: vni {spec.vni} on {spec.local}:{spec.port} twice")
        specs.append(spec)
    return tuple(specs)
