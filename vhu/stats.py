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
import time

import numpy as np

from vhu._ring import COUNTER_NAMES

_INDEX = {name: i for i, name in enumerate(COUNTER_NAMES)}
BROKEN_NAMES = [n for n in COUNTER_NAMES if n.startswith("broken_") and n != "broken_ok_unused"]


class StatsMemory:
    """The shared counter array: created by the master, handed to workers as an fd."""

    def __init__(self, ports, rings_per_port):
        self.ports = ports
        self.rings_per_port = rings_per_port
        self.size = max(ports * rings_per_port * len(COUNTER_NAMES) * 8, mmap.PAGESIZE)
        self.fd = os.memfd_create("vhu-stats", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size)
        self.array = np.frombuffer(self._map, dtype=np.uint64).reshape(-1)[
            : ports * rings_per_port * len(COUNTER_NAMES)].reshape(
            ports, rings_per_port, len(COUNTER_NAMES))

    def dup_fd(self):
        return os.dup(self.fd)

    def snapshot(self):
        return self.array.copy()

    def close(self):
        self.array = None
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
}


def queue_stats(snap, port, qp):
    rx_ring, tx_ring = snap[port, 2 * qp], snap[port, 2 * qp + 1]

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
    }
    return out


def port_stats(snap, port, queues, name, connected, worker_of=None):
    """worker_of: queue pair -> index of the worker polling it (MasterConfig.worker_of)."""
    qs = [queue_stats(snap, port, q) for q in range(queues)]
    if worker_of is not None:
        for q in qs:
            q["worker"] = worker_of(q["queue"])
    total = {k: sum(q[k] for q in qs) for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                                                "kicks", "calls", "calls_suppressed")}
    drops = {}
    broken = {}
    for q in qs:
        for k, v in q["drops"].items():
            drops[k] = drops.get(k, 0) + v
        for k, v in q["broken"].items():
            broken[k] = broken.get(k, 0) + v
    return {"port": port, "socket": name, "connected": connected, **total,
            "drops": sum(drops.values()), "drops_by_reason": drops, "broken": broken,
            "queues": qs}


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
            f"drops {now['drops']} | broken {broken}")


def write_json(path, ports):
    """Atomically replace path with the stats document."""
    doc = {"time": time.time(), "ports": ports}
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


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
