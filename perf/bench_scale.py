"""Issue 19 figures: the cross-worker RX-ring lock.

    python -m perf.bench_scale [--seconds 3] [--workers 1,2] [--rounds 10000000]

1. Uncontended cost: one take + give back of a ring's lock, with the cursor
   reload from the shared position (what a worker pays once per RX ring per
   batch when the ring is shared), from vhu.workers._engine.rx_lock_cost.
2. Contended throughput: vhu.master --app switch with three ports. Two
   front-ends (python -m vhu.frontend --mode tx, broadcast frames) send on
   ports 0 and 1, one receives on port 2 (--mode rx). Broadcasts are flooded,
   so with --workers 2 the worker polling port 0 and the one polling port 1
   both deliver into port 2's RX ring (and into each other's port): the
   lock is contended. With --workers 1 the same ring is lock-free. The rate
   is what port 2's guest received (vhu's tx_packets of port 2), with the
   batches that found the lock taken (rx_contended).
On this two-core host every front-end and worker busy-polls: five spinning
processes share two CPUs, so the rates say little about a real host (see
PROFILE.md, "Scaling across workers", for the model).
"""
import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time

from vhu.demo import stop_backend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lock_cost(rounds):
    from vhu._mem import GuestMemory
    from vhu._ring import COUNTER_NAMES, DeviceRing
    from vhu.workers._engine import rx_lock_cost
    fd = os.memfd_create("bench-guest")
    os.ftruncate(fd, 1 << 20)
    mem = GuestMemory()
    uva = 0x7F0000000000
    mem.set_table([(fd, 0, 1 << 20, uva, 0)])
    ring = DeviceRing(mem, 256, uva, uva + 0x2000, uva + 0x4000)
    counters = mmap.mmap(-1, len(COUNTER_NAMES) * 8)
    ring.bind_counters(counters, 0)
    best = min(rx_lock_cost(ring, 0, rounds) for _ in range(5))
    del ring
    mem.clear()
    os.close(fd)
    return best


def stats(path):
    for _ in range(100):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            time.sleep(0.05)
    raise RuntimeError("no stats file")


def contended(workers, seconds, size):
    d = tempfile.mkdtemp(prefix="vhu-scale-")
    socks = [os.path.join(d, f"p{i}.sock") for i in range(3)]
    sfile = os.path.join(d, "stats.json")
    argv = [sys.executable, "-m", "vhu.master", "--app", "switch", "--workers", str(workers),
            "--poll", "busy", "--stats-file", sfile, "--stats-interval", "0.25"]
    for s in socks:
        argv += ["--socket", s]
    log = open(os.path.join(d, "master.log"), "w")
    master = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    fronts = []
    try:
        deadline = time.monotonic() + 60
        while not all(os.path.exists(s) for s in socks):
            if time.monotonic() > deadline or master.poll() is not None:
                raise RuntimeError(open(log.name).read())
            time.sleep(0.05)
        for s, mode in zip(socks, ("tx", "tx", "rx")):
            fronts.append(subprocess.Popen(
                [sys.executable, "-m", "vhu.frontend", "--socket", s, "--mode", mode,
                 "--pkt-size", str(size), "--duration", str(seconds + 6), "--quiet"],
                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(3)                    # connected, learning done, rates steady
        a, ta = stats(sfile), time.monotonic()
        time.sleep(seconds)
        b, tb = stats(sfile), time.monotonic()
        dt = tb - ta

        def rate(doc, port, key):
            return doc["ports"][port][key]
        out = {"workers": workers,
               "port2_mpps": (rate(b, 2, "tx_packets") - rate(a, 2, "tx_packets")) / dt / 1e6,
               "sent_mpps": sum(rate(b, p, "rx_packets") - rate(a, p, "rx_packets")
                                for p in (0, 1)) / dt / 1e6,
               "rx_contended_per_s": (b["ports"][2]["queues"][0]["rx_contended"]
                                      - a["ports"][2]["queues"][0]["rx_contended"]) / dt,
               "port2_no_room_per_s": (b["ports"][2]["drops_by_reason"]["rx_no_room"]
                                       - a["ports"][2]["drops_by_reason"]["rx_no_room"]) / dt,
               "pollers": [p["queues"][0]["worker"] for p in b["ports"]]}
        return out
    finally:
        for f in fronts:
            if f.poll() is None:
                f.kill()
            f.wait()
        stop_backend(master)
        log.close()
        shutil.rmtree(d, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    print(f"uncontended lock + reload + unlock: {lock_cost(a.rounds):.1f} ns per batch "
          f"(best of 5 x {a.rounds} rounds)")
    for _ in range(a.repeat):
        for w in map(int, a.workers.split(",")):
            r = contended(w, a.seconds, a.size)
            print(f"workers {r['workers']} (pollers of ports 0,1,2: {r['pollers']}): "
                  f"port 2 received {r['port2_mpps']:.2f} Mpps of {r['sent_mpps']:.2f} Mpps sent "
                  f"on ports 0+1; rx_contended {r['rx_contended_per_s']:.0f}/s, "
                  f"no room {r['port2_no_room_per_s'] / 1e6:.2f} M/s")


if __name__ == "__main__":
    main()
