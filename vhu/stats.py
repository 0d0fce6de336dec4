"""Per-port and per-queue statistics, read from the counters workers keep in
shared memory (one u64 array; each ring's counters written only by the
worker that owns the ring). One table, vhu._ring.COUNTER_NAMES, names them.

Direction is vhu's, as testpmd reports a port: rx = frames vhu received from
the front-end (the guest's TX ring), tx = frames vhu put into the front-end
(the guest's RX ring).
"""
import json
import mmap
import os
import tempfile
import time
from typing import NamedTuple

import numpy as np

from vhu._ring import COUNTER_NAMES
from vhu.netqueues import RECEIVEQ, TRANSMITQ, queue_pair, ring_index, side

_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}
BROKEN_NAMES = [n for n in COUNTER_NAMES if n.startswith("broken_") and n != "broken_ok_unused"]
COUNTERS_PER_RING = len(COUNTER_NAMES)
# A queue pair's two rings (one worker writes both) share a block padded to
# whole cache lines, so no two workers ever write one line (false sharing
# would cost a line transfer per batch on each side).
PAIR_WORDS = (2 * COUNTERS_PER_RING + 7) // 8 * 8
POSITION = _INDEX["state_position"]     # a ring's published position, not a counter


class Layout(NamedTuple):
    """The shape of the shared memory: what the master creates and every
    worker maps. Counters of (port, ring), then one slot per worker."""
    ports: int
    rings_per_port: int
    workers: int

    @property
    def counters_bytes(self):
        return self.ports * (self.rings_per_port // 2) * PAIR_WORDS * 8

    @property
    def size(self):
        return max(self.counters_bytes + self.workers * WorkerSlot.SIZE, mmap.PAGESIZE)


def counter_offset(port, ring, rings_per_port):
    """Byte offset of (port, ring)'s counters in the shared stats memory (a
    queue pair's RX ring, then its TX ring, in a block of PAIR_WORDS)."""
    return ((port * (rings_per_port // 2) + queue_pair(ring)) * PAIR_WORDS
            + side(ring) * COUNTERS_PER_RING) * 8


class WorkerSlot:
    """A worker's slot: written by the worker (and its fault guard), read by
    the supervisor. One cache line each, so workers never share one."""
    SIZE = 64
    HEARTBEAT = 0           # u64 the engine bumps about every millisecond
    FAULT = 8               # u64 x 3: signal, faulting address, port + 1 (vhu.workers._guard)
    LOAD = 32               # u64 x 2: the loop's polling ticks, and its busy ticks (Engine.set_load)

    @staticmethod
    def offset(layout, worker):
        return Layout(*layout).counters_bytes + worker * WorkerSlot.SIZE


class StatsMemory:
    """The shared counter array: created by the master, handed to workers as an fd."""

    def __init__(self, ports, rings_per_port, workers=0):
        if rings_per_port % 2:
            raise ValueError("rings come in queue pairs")
        self.layout = Layout(ports, rings_per_port, workers)
        self.ports = ports
        self.rings_per_port = rings_per_port
        self.size = self.layout.size
        self.fd = os.memfd_create("vhu-stats", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size)
        words = np.frombuffer(self._map, dtype=np.uint64)
        pairs = words[: self.layout.counters_bytes // 8].reshape(ports, rings_per_port // 2, PAIR_WORDS)
        # [port, pair, RX or TX ring, counter]: a view, padding left out
        self.array = pairs[:, :, : 2 * COUNTERS_PER_RING].reshape(
            ports, rings_per_port // 2, 2, COUNTERS_PER_RING)
        self.slots = words[self.layout.counters_bytes // 8:][
            : workers * WorkerSlot.SIZE // 8].reshape(workers, WorkerSlot.SIZE // 8)

    def dup_fd(self):
        return os.dup(self.fd)

    def snapshot(self):
        """A copy of every counter: [port, ring, counter]."""
        return np.array(self.array).reshape(self.ports, self.rings_per_port, COUNTERS_PER_RING)

    def ring(self, port, ring):
        """A view of one ring's counters."""
        return self.array[port, queue_pair(ring), side(ring)]

    def heartbeat(self, worker):
        return int(self.slots[worker, WorkerSlot.HEARTBEAT // 8])

    def load(self, worker):
        """(polling ticks, busy ticks) of the worker in that slot: busy over
        polling is the share of its loop's time spent moving frames."""
        w = WorkerSlot.LOAD // 8
        return int(self.slots[worker, w]), int(self.slots[worker, w + 1])

    def fault(self, worker):
        """(signal, address, port or None) the worker's fault guard recorded, or None."""
        w = WorkerSlot.FAULT // 8
        sig, addr, port = (int(x) for x in self.slots[worker, w:w + 3])
        return (sig, addr, port - 1 if port else None) if sig else None

    def clear_slot(self, worker):
        self.slots[worker, :] = 0

    def position(self, port, ring):
        """Where the ring's last published batch left it (split: used idx;
        packed: position | wrap << 15)."""
        return int(self.ring(port, ring)[POSITION])

    def reset_port(self, port):
        """Zero a port index's counters (a new port takes an index a removed one had)."""
        self.array[port] = 0

    def count(self, port, ring, name, n=1):
        """Add to a counter from the master (only while no worker runs the ring)."""
        self.ring(port, ring)[_INDEX[name]] += n

    def close(self):
        self.array = None
        self.slots = None
        self._map.close()
        os.close(self.fd)


# Drop reasons: reason -> the counters (summed over the queue pair's two
# rings) it is made of. Every drop vhu makes is in exactly one of them.
DROP_REASONS = {
    "rx_no_room": ("rx_no_room",),          # the receiving guest had no buffer
    "rx_too_big": ("rx_too_big",),          # frame larger than its buffer (no mergeable)
    "tx_short": ("tx_short",),              # chain shorter than the virtio-net header
    "filtered": ("drop_filtered",),         # switch: destination behind the in-port, runt
    "no_port": ("drop_no_port",),           # a verdict named a port not served here
    "stage": ("drop_stage",),               # a pipeline stage said drop
    "stage_error": ("drop_stage_error",),   # a pipeline stage raised on the batch
    "tx_too_big": ("tx_too_big",),          # a chain over virtio-net's 65535-byte frame bound
    "bad_offload": ("tx_bad_offload",),     # a virtio_net_hdr vhu does not honour (vhu.workers._offload)
    "vxlan_bad": ("vxlan_bad",),            # VXLAN: bad flags, another VNI, short or oversized
    "vxlan_foreign": ("vxlan_foreign",),    # VXLAN: from an address not in the remote list
    "vxlan_too_big": ("vxlan_too_big",),    # VXLAN: an inner frame over the underlay MTU
}

# Offload counters (vhu.workers._offload): frames, not bytes. tx_*: large
# (TSO) or partial-checksum frames from the guest; rx_*: what the guest got
# as it is (gso, csum), segmented by vhu, or with its checksum finished by vhu.
OFFLOAD_COUNTERS = ("tx_gso", "tx_csum", "rx_gso", "rx_csum", "rx_segmented", "rx_csum_done")


def queue_stats(snap, port, qp):
    rx_ring, tx_ring = snap[port, ring_index(qp, RECEIVEQ)], snap[port, ring_index(qp, TRANSMITQ)]

    def both(name):
        return int(rx_ring[_INDEX[name]] + tx_ring[_INDEX[name]])
    out = {
        "queue": qp,
        "rx_packets": int(tx_ring[_INDEX["tx_frames"]]),
        "rx_bytes": int(tx_ring[_INDEX["tx_bytes"]]),
        "tx_packets": int(rx_ring[_INDEX["rx_frames"]]),
        "tx_bytes": int(rx_ring[_INDEX["rx_bytes"]]),
        "drops": {reason: sum(both(n) for n in names) for reason, names in DROP_REASONS.items()},
        "kicks": both("kicks"),                         # eventfd kicks the guest sent us
        "calls": both("notify"),                        # interrupts we sent the guest
        "calls_suppressed": both("notify_suppressed"),  # ... and those it asked us not to
        "broken": {n[len("broken_"):]: both(n) for n in BROKEN_NAMES if both(n)},
        "offload": {n: both(n) for n in OFFLOAD_COUNTERS},
        # batches whose frames for this RX ring waited: another worker held its lock
        "rx_contended": both("rx_contended"),
    }
    return out


# Counters that move on a ring nobody uses: a guest kicks the receive rings
# of all its queue pairs at probe, QEMU enables only those the guest asks for.
_NOT_USE = [_INDEX[n] for n in ("kicks", "notify", "notify_suppressed", "state_position",
                                 "state_rx_lock", "state_rx_epoch")]


def queues_in_use(snap, port, in_use):
    """How many queue pairs a port's stats list: those front-ends have started
    and enabled on it since the master started (`in_use`, a high-water mark
    the port keeps), and any that carried or dropped a frame or broke (their
    counters outlive the front-end), at least one. Not the --queues offered."""
    used = np.delete(snap[port], _NOT_USE, axis=1).reshape(snap.shape[1] // 2, -1).any(axis=1)
    moved = np.flatnonzero(used)
    return max(1, int(in_use), int(moved[-1]) + 1 if moved.size else 0)


def port_stats(snap, port, queues, name, connected, worker_of=None, logging=False):
    """One port's document (the stats line, JSON, metrics). queues: the queue
    pairs front-ends have used on it; queues_in_use decides which are listed.
    The totals are over every ring (kicks on a ring never enabled included).
    worker_of: queue pair -> index of the worker polling it (MasterConfig.worker_of).
    logging: the front-end has dirty-page logging on (a live migration runs);
    log_pages counts the log bits set, over every ring, since the master started."""
    every = [queue_stats(snap, port, q) for q in range(snap.shape[1] // 2)]
    qs = every[:queues_in_use(snap, port, queues)]
    if worker_of is not None:
        for q in qs:
            q["worker"] = worker_of(q["queue"])
    total = {k: sum(q[k] for q in every) for k in ("rx_packets", "rx_bytes", "tx_packets",
                                                   "tx_bytes", "kicks", "calls",
                                                   "calls_suppressed")}
    drops = {}
    broken = {}
    for q in qs:
        for k, v in q["drops"].items():
            drops[k] = drops.get(k, 0) + v
        for k, v in q["broken"].items():
            broken[k] = broken.get(k, 0) + v
    offload = {n: sum(q["offload"][n] for q in every) for n in OFFLOAD_COUNTERS}
    return {"port": port, "socket": name, "connected": connected, **total,
            "drops": sum(drops.values()), "drops_by_reason": drops, "broken": broken,
            "offload": offload, "queues": qs, "logging": "on" if logging else "off",
            "log_pages": int(snap[port, :, _INDEX["log_pages"]].sum())}


def rates(now, before, dt):
    """Per-second rates between two samples of a port or a queue (anything with
    rx/tx packets and bytes): packets/s and bits/s each way. No earlier sample,
    no time between them, or a counter that went down (a new master): zeros."""
    keys = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes")
    if not before or dt <= 0 or any(now[k] < before[k] for k in keys):
        return {"rx_pps": 0.0, "rx_bps": 0.0, "tx_pps": 0.0, "tx_bps": 0.0}
    return {"rx_pps": (now["rx_packets"] - before["rx_packets"]) / dt,
            "rx_bps": (now["rx_bytes"] - before["rx_bytes"]) * 8 / dt,
            "tx_pps": (now["tx_packets"] - before["tx_packets"]) / dt,
            "tx_bps": (now["tx_bytes"] - before["tx_bytes"]) * 8 / dt}


def rate_line(now, before, dt):
    """One testpmd-like line for a port: totals and per-second rates."""
    r = rates(now, before, dt)
    rx_pps, tx_pps, rx_bps, tx_bps = r["rx_pps"], r["tx_pps"], r["rx_bps"], r["tx_bps"]
    broken = ",".join(f"{k}={v}" for k, v in now["broken"].items()) or "-"
    return (f"port {now['port']} {now['socket']} {'up' if now['connected'] else 'down'}: "
            f"rx {now['rx_packets']} pkts {rx_pps / 1e6:.3f} Mpps {rx_bps / 1e9:.3f} Gbps | "
            f"tx {now['tx_packets']} pkts {tx_pps / 1e6:.3f} Mpps {tx_bps / 1e9:.3f} Gbps | "
            f"drops {now['drops']} | broken {broken}"
            f"{_logging_part(now)}")


def _logging_part(doc):
    # Migration state: said while a front-end logs, or once it has (pages marked).
    if "logging" not in doc:
        return ""
    return f" | logging: {doc['logging']}, {doc.get('log_pages', 0)} pages marked"


def write_json(path, ports, **extra):
    """Atomically replace path with the stats document. The temporary is
    created in the same directory with O_EXCL | O_NOFOLLOW and an
    unpredictable name (mkstemp), and rename(2) replaces a symlink at path
    rather than following it: nobody can make us write elsewhere."""
    doc = {"time": time.time(), "ports": ports, **extra}
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def read_json(path):
    """The stats document write_json wrote (or a copy of it)."""
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    """python -m vhu.stats --stats-file PATH [--interval S] [--count N] [--top]:
    follow a running master's JSON stats file and print live rates, one line
    per port per report, or (--top) as a full-screen table (vhu.top)."""
    import argparse
    import sys
    p = argparse.ArgumentParser(prog="python -m vhu.stats",
                                description="live rates of a running vhu.master")
    p.add_argument("--stats-file", required=True, metavar="PATH",
                   help="the master's --stats-file")
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS")
    p.add_argument("--count", type=int, default=0, metavar="N", help="stop after N reports (0: never)")
    p.add_argument("--top", action="store_true",
                   help="a live full-screen table, one row per port and queue (q quits)")
    a = p.parse_args(sys.argv[1:] if argv is None else argv)
    if a.top:
        from vhu.top import main as top_main
        return top_main(a.stats_file, a.interval)
    before, t_before, n = None, None, 0
    try:
        while True:
            try:
                doc = read_json(a.stats_file)
            except (OSError, ValueError) as exc:
                print(f"vhu.stats: {a.stats_file}: {exc}", file=sys.stderr)
                return 1
            t = doc["time"]
            dt = t - t_before if t_before is not None else 0
            if before is None or dt > 0:
                for i, port in enumerate(doc["ports"]):
                    prev = before[i] if before and i < len(before) else None
                    line = rate_line(port, prev, dt)
                    drops = ",".join(f"{k}={v}" for k, v in port["drops_by_reason"].items() if v)
                    print(f"{line}{' (' + drops + ')' if drops else ''}", flush=True)
                before, t_before = doc["ports"], t
                n += 1
                if a.count and n >= a.count:
                    return 0
            time.sleep(a.interval)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
