"""End-to-end benchmarks (pyperf) with vhu.frontend as the peer.

One value is one measurement window; the reported time is per packet, read
at the front-end (vhu.frontend in the benchmark process, pinned to CPU 1;
the back-end pinned to CPU 0):

  vhu sink   <- vhu.frontend tx     (vhu.master --app sink --poll busy --cpus 0)
  vhu echo   <> vhu.frontend loop   (every frame back and checked)
  dpdk txonly -> vhu.frontend rx    (testpmd --vdev net_vhost0, the reference back-end)

    python perf/bench_frontend.py -o perf/frontend.json
    python -m pyperf stats perf/frontend.json
"""
import os
import sys
import tempfile
import time

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backends import BACKEND_CPU, PEER_CPU, DpdkBackend, VhuBackend  # noqa: E402

from vhu.frontend import Frontend  # noqa: E402

WINDOW, WARMUP = 2.0, 0.5
RING, BATCH = 256, 32
ROWS = {   # name: (back-end, its row in perf/backends.py, front-end mode, counter)
    "vhu sink <- vhu.frontend tx": ("vhu", "sink", "tx", "tx_packets"),
    "vhu echo <> vhu.frontend loop": ("vhu", "echo", "loop", "rx_packets"),
    "dpdk txonly -> vhu.frontend rx": ("dpdk", "source", "rx", "rx_packets"),
}


class LoggedVhuBackend(VhuBackend):
    """VhuBackend with its output kept, so a failed start says why."""

    def __enter__(self):
        import subprocess
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vhu-bench-master-", suffix=".log")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                raise RuntimeError(f"vhu.master did not start: {self.log.read()[-1000:]}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.log.close()


def per_packet(loops, name, size, packed):
    backend_name, row, mode, counter = ROWS[name]
    tmp = tempfile.TemporaryDirectory(prefix="vhu-bench-")
    sock = os.path.join(tmp.name, "vhost.sock")
    be = DpdkBackend(sock, row, size) if backend_name == "dpdk" else LoggedVhuBackend(sock, row, size)
    cpus = os.sched_getaffinity(0)
    try:
        with be:
            # Pinned after the back-end started (children inherit the affinity),
            # and unpinned after: pyperf calls this several times in one process.
            os.sched_setaffinity(0, {PEER_CPU})
            if backend_name == "dpdk":
                be.tp.start()
            with Frontend(sock, ring_size=RING, pkt_size=size, packed=packed, timeout=20) as fe:
                fe.run(mode, duration=WARMUP, batch=BATCH)
                r = fe.run(mode, duration=WINDOW, batch=BATCH)
    finally:
        os.sched_setaffinity(0, cpus)
        tmp.cleanup()
    packets = getattr(r, counter)
    if not packets or r.errors:
        raise RuntimeError(f"{name} {size}B: {r.summary()}")
    return r.seconds / packets * loops


def main():
    runner = pyperf.Runner(processes=1, values=3, warmups=0, loops=1)
    for packed in (False, True):
        for size in (64, 1500):
            for name in ROWS:
                features = "VERSION_1|MRG_RXBUF|EVENT_IDX|PROTOCOL_FEATURES" + \
                           ("|RING_PACKED" if packed else "")
                runner.metadata.update({
                    "frame_size": size, "batch": BATCH, "ring_size": RING,
                    "poll_mode": "busy (front-end and back-end)", "features": features,
                    "ring": "packed" if packed else "split", "peer": "vhu.frontend",
                    "cpus": f"back-end {BACKEND_CPU}, front-end {PEER_CPU}"})
                runner.bench_time_func(f"{name} {'packed' if packed else 'split'} {size}B per packet",
                                       per_packet, name, size, packed)


if __name__ == "__main__":
    main()
