"""Patch two vhost-user ports, dropping IPv6 and counting frames per source MAC.

    python examples/drop_ethertype.py /tmp/a.sock /tmp/b.sock
"""
import sys
import time

import numpy as np

from vhu.workers import APP, DROP, Forwarder

FLOWS = {}      # per worker process: source MAC -> frames


def no_ipv6_count_sources(batch):           # once per batch, in the worker process
    macs, counts = np.unique(batch.src_mac, return_counts=True)
    for m, c in zip(macs.tolist(), counts.tolist()):
        FLOWS[m] = FLOWS.get(m, 0) + c
    return np.where(batch.ethertype == 0x86DD, DROP, APP)


if __name__ == "__main__":                  # workers are spawned: they import this file
    with Forwarder(sys.argv[1:3], pipeline=[no_ipv6_count_sources, "patch"]) as fw:
        while True:                         # Ctrl-C: leaving the with block stops vhu
            time.sleep(2)
            for p in fw.stats():
                print(p["socket"], p["rx_packets"], "in", p["drops_by_reason"]["stage"], "IPv6 dropped")
