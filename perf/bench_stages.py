"""What a Python pipeline stage costs: vhu's drain rate from one testpmd
txonly front-end (64-byte frames, vhu on CPU 0, testpmd on CPU 1), sink alone
against Python stages at two batch sizes. A rough figure (not pyperf): the
machine's other load shows in it.

    python -m perf.bench_stages [--seconds 3]
"""
import argparse
import os
import tempfile
import time

import numpy as np

from vhu.testbed.dpdk import Testpmd, virtio_user_vdev
from vhu.workers import APP, DROP, Forwarder


def noop(batch):
    return None


def no_ipv6(batch):
    return np.where(batch.ethertype == 0x86DD, DROP, APP)


def drain_rate(pipeline, batch, seconds):
    with tempfile.TemporaryDirectory(prefix="vhu-bs-") as d:     # removed on failure too
        sock = os.path.join(d, "a.sock")
        with Forwarder([sock], pipeline=pipeline, cpus=(0,), batch=batch) as fw:
            with Testpmd([virtio_user_vdev(sock)], forward_mode="txonly", cpus=1, huge=False) as tp:
                tp.wait_link_up(0)
                tp.start()
                time.sleep(0.5)
                n0, t0 = fw.stats()[0]["rx_packets"], time.monotonic()
                time.sleep(seconds)
                n1, t1 = fw.stats()[0]["rx_packets"], time.monotonic()
                tp.stop()
    return (n1 - n0) / (t1 - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    a = p.parse_args()
    for name, pipeline, batch in [("sink", ["sink"], 32), ("noop stage", [noop], 32),
                                  ("ethertype stage", [no_ipv6], 32),
                                  ("ethertype stage", [no_ipv6], 256)]:
        rate = drain_rate(pipeline, batch, a.seconds)
        print(f"{name:16s} batch {batch:3d}: {rate / 1e6:6.3f} Mpps", flush=True)


if __name__ == "__main__":
    main()
