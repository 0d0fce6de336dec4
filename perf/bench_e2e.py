"""End-to-end benchmarks (pyperf): vhu.master with a real front-end as peer.

One value is one measurement window; the reported time is per packet, read
at the front-end (DPDK testpmd virtio-user on CPU 1; the back-end on CPU 0).
DPDK's own vhost back-end runs under the same harness for comparison.

    python perf/bench_e2e.py -o perf/e2e.json [--fast]
    python -m pyperf stats perf/e2e.json
"""
import itertools
import os
import sys
import tempfile

import pyperf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from backends import DpdkBackend, VhuBackend, measure  # noqa: E402

WINDOW = 2.0


def per_packet(loops, backend_name, row, size, packed=False):
    with tempfile.TemporaryDirectory(prefix="vhu-bench-") as d:
        sock = os.path.join(d, "vhost.sock")
        be = DpdkBackend(sock, row, size) if backend_name == "dpdk" else VhuBackend(sock, row, size)
        r = measure(be, sock, row, size, seconds=WINDOW, warmup=0.5, packed=packed)
    if not r["packets"]:
        raise RuntimeError(f"{backend_name} {row} {size}B moved no packets")
    return r["seconds"] / r["packets"] * loops


def main():
    runner = pyperf.Runner(processes=1, values=3, warmups=0, loops=1)
    for ring, size, row, backend in itertools.product(
            ("split", "packed"), (64, 1500), ("sink", "source", "echo"), ("vhu", "dpdk")):
        features = "VERSION_1|MRG_RXBUF|EVENT_IDX" + ("|RING_PACKED" if ring == "packed" else "")
        runner.metadata.update({"frame_size": size, "batch": 32, "ring_size": 256,
                                "poll_mode": "busy", "features": features, "ring": ring,
                                "peer": "dpdk-testpmd virtio-user"})
        runner.bench_time_func(f"{backend} {row} {ring} {size}B per packet", per_packet,
                               backend, row, size, ring == "packed")


if __name__ == "__main__":
    main()
