"""python -m vhu.frontend: drive a vhost-user back-end as a front-end would.

    python -m vhu.frontend --socket PATH [--listen] [--mode tx|rx|loop] [--pkt-size N]
                           [--queues Q] [--duration S] [--count N] [--log]

tx generates frames, rx counts them, loop sends numbered frames and checks
each one that comes back. One rate line per second, then a summary line.
--log turns dirty-page logging on after set-up, as QEMU does when a live
migration starts (LOG_ALL, a log memfd, VHOST_VRING_F_LOG on every ring),
and after the run checks that every page of the receive buffers and used
rings the back-end changed meanwhile is marked in the log.
Exit status: 0; 1 on a protocol failure, (loop) any error, or (--log) a page
written and not marked; 2 on bad arguments.
"""
import argparse
import logging
import signal
import sys
from dataclasses import dataclass
from typing import Optional

from ._traffic import MODES, POLL_MODES
from .client import FrontendError
from .device import MAX_PKT, MAX_QUEUES, MIN_PKT, Frontend
from ..ring_layout import MAX_QUEUE_SIZE


class UsageError(Exception):
    """A bad command line; the message is one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


@dataclass(frozen=True)
class Options:
    socket: str
    listen: bool = False
    mode: str = "tx"
    pkt_size: int = 64
    queues: int = 1
    duration: Optional[float] = None
    count: int = 0
    ring_size: int = 256
    packed: bool = False
    legacy: bool = False
    batch: int = 32
    poll: str = "busy"
    timeout: float = 10.0
    quiet: bool = False
    log: bool = False


def build_parser():
    p = _Parser(prog="python -m vhu.frontend",
                description="vhost-user front-end (virtio-net driver) with a compiled data path")
    p.add_argument("--socket", required=True, metavar="PATH", help="the back-end's socket")
    p.add_argument("--listen", action="store_true",
                   help="create the socket and wait for a back-end in client mode")
    p.add_argument("--mode", default="tx", help="tx (generate), rx (count), loop (send and check)")
    p.add_argument("--pkt-size", type=int, default=64, metavar="N",
                   help=f"frame bytes without the virtio-net header ({MIN_PKT}..{MAX_PKT})")
    p.add_argument("--queues", type=int, default=1, metavar="Q", help="queue pairs (MQ)")
    p.add_argument("--duration", type=float, metavar="S", help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="stop after N frames sent (tx, loop) or received (rx)")
    p.add_argument("--ring-size", type=int, default=256, metavar="N", help="descriptors per ring")
    p.add_argument("--packed", action="store_true", help="packed virtqueues (VIRTIO_F_RING_PACKED)")
    p.add_argument("--legacy", action="store_true",
                   help="negotiate neither VERSION_1 nor MRG_RXBUF nor PROTOCOL_FEATURES (10-byte header)")
    p.add_argument("--batch", type=int, default=32, metavar="N", help="frames added per kick (1..256)")
    p.add_argument("--poll", default="busy", help="busy (spin) or adaptive (sleep on call eventfds when idle)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S",
                   help="connect/accept and reply timeout")
    p.add_argument("--quiet", action="store_true", help="summary line only")
    p.add_argument("--log", action="store_true",
                   help="dirty-page logging on (as during a live migration); check the log after")
    return p


def parse_args(argv=None) -> Options:
    a = build_parser().parse_args(argv)
    if a.mode not in MODES:
        raise UsageError(f"--mode: {a.mode!r} is not one of {', '.join(MODES)}")
    if a.poll not in POLL_MODES:
        raise UsageError(f"--poll: {a.poll!r} is not one of {', '.join(POLL_MODES)}")
    if not MIN_PKT <= a.pkt_size <= MAX_PKT:
        raise UsageError(f"--pkt-size: {a.pkt_size} is not in {MIN_PKT}..{MAX_PKT}")
    if not 1 <= a.queues <= MAX_QUEUES:
        raise UsageError(f"--queues: {a.queues} is not in 1..{MAX_QUEUES}")
    if a.duration is not None and not a.duration > 0:
        raise UsageError(f"--duration: {a.duration} is not a positive number of seconds")
    if a.count < 0:
        raise UsageError(f"--count: {a.count} is negative")
    if not 1 <= a.batch <= 256:
        raise UsageError(f"--batch: {a.batch} is not in 1..256")
    if a.timeout <= 0:
        raise UsageError("--timeout must be positive")
    n = a.ring_size
    if not 1 <= n <= MAX_QUEUE_SIZE or (not a.packed and n & (n - 1)):
        raise UsageError(f"--ring-size: {n} is not {'' if a.packed else 'a power of two '}"
                         f"in 1..{MAX_QUEUE_SIZE}")
    if a.legacy and a.packed:
        raise UsageError("--legacy and --packed exclude each other (packed rings need VERSION_1)")
    if a.legacy and a.queues > 1:
        raise UsageError("--legacy allows one queue pair (MQ needs PROTOCOL_FEATURES)")
    if a.legacy and a.log:
        raise UsageError("--legacy and --log exclude each other "
                         "(LOG_SHMFD needs PROTOCOL_FEATURES)")
    return Options(a.socket, a.listen, a.mode, a.pkt_size, a.queues, a.duration, a.count,
                   a.ring_size, a.packed, a.legacy, a.batch, a.poll, a.timeout, a.quiet, a.log)


def run(o: Options, out=None) -> int:
    out = out or sys.stdout

    def say(line):
        print(line, file=out, flush=True)

    # SIGTERM ends the run like Ctrl-C: drain, tear down, print the summary.
    def on_term(*_):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGTERM, on_term)
    try:
        with Frontend(o.socket, listen=o.listen, queues=o.queues, ring_size=o.ring_size,
                      packed=o.packed, legacy=o.legacy, pkt_size=o.pkt_size,
                      timeout=o.timeout, log=o.log) as fe:
            if not o.quiet:
                say(f"connected to {o.socket}: features {fe.features:#x}, "
                    f"{'packed' if o.packed else 'split'} rings of {o.ring_size}, "
                    f"{o.queues} queue pair(s), {fe.hdr_len}-byte header, mode {o.mode}")
            result = fe.run(o.mode, duration=o.duration, count=o.count, batch=o.batch,
                            poll=o.poll, on_second=None if o.quiet else say)
            check = None
            if o.log:
                fe.stop()                 # GET_VRING_BASE: the back-end writes nothing more
                check = fe.check_log()
    finally:
        signal.signal(signal.SIGTERM, old)
    say(result.summary())
    if check is not None:
        say(check.summary())
        if check.unmarked:
            return 1
    if o.mode == "loop" and result.errors:
        return 1
    return 0


def main(argv=None) -> int:
    try:
        opts = parse_args(argv)
    except UsageError as e:
        print(f"python -m vhu.frontend: error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(opts)
    except (FrontendError, ValueError, OSError) as e:
        print(f"python -m vhu.frontend: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:         # during set-up (a run itself ends with its summary)
        print("python -m vhu.frontend: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
