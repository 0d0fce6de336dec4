"""Issue 19 with QEMU: four Linux guests through one vhu --app switch with
two workers. Their single-queue ports are placed round-robin (two per
worker), so every ping crosses between workers somewhere: a worker learns
a station, the other finds it in the shared MAC table, and both deliver
into RX rings they share under the lock. Each guest pings the next: 20 of 20.

Needs QEMU, busybox-static and the Debian kernel (scripts/setup-peers.sh).
"""
import os
import shutil
import tempfile
import time

import pytest

from tests.vhuproc import VhuMaster
from vhu.testbed.guest import Guest

pytestmark = pytest.mark.peers("qemu")
BOOT_TIMEOUT = 240
NAMES = "abcd"
IPS = {n: f"10.0.19.{i + 1}" for i, n in enumerate(NAMES)}
MACS = {n: f"52:54:00:00:19:0{i + 1}" for i, n in enumerate(NAMES)}


class _Dir:
    """Short socket paths (AF_UNIX limit), usable as VhuMaster's tmp_path."""

    def __init__(self):
        self.path = tempfile.mkdtemp(prefix="vhu-19-")

    def __truediv__(self, name):
        return os.path.join(self.path, name)


def test_four_guests_two_workers_each_pings_the_next():
    d = _Dir()
    vhu = VhuMaster(d, "--app", "switch", "--workers", 2, sockets=[f"{n}.sock" for n in NAMES])
    guests, served = {}, False
    try:
        vhu.wait_sockets()
        vhu.wait_started()
        for i, n in enumerate(NAMES):
            guests[n] = Guest(d / f"{n}.sock", ip=f"{IPS[n]}/24", mac=MACS[n], cpu=i % 2,
                              name=f"vhu-19-{n}-{os.getpid()}",
                              log_path=d / f"{n}.console").launch()
        for g in guests.values():
            g.wait_ready(BOOT_TIMEOUT)
        for i, src in enumerate(NAMES):
            dst = NAMES[(i + 1) % len(NAMES)]
            res = guests[src].ping(IPS[dst], count=20, interval=0.2, deadline=60)
            print(f"\n{src} -> {dst}: {res['received']} of 20")
            assert res["received"] == 20, (src, dst, res["output"])
        doc = vhu.stats()
        pollers = [p["queues"][0]["worker"] for p in doc["ports"]]
        assert sorted(pollers) == [0, 0, 1, 1], pollers
        assert all(p["queues"][0]["rx_writers"] if "rx_writers" in p["queues"][0] else True
                   for p in doc["ports"])
        for p in doc["ports"]:
            assert p["rx_packets"] >= 20 and p["tx_packets"] >= 20, p
        served = True
    finally:
        for g in guests.values():
            g.close()
        vhu.stop(check=served)      # the balance check, unless the test failed already
        shutil.rmtree(d.path, ignore_errors=True)


def test_patch_over_two_workers_rides_out_worker_kills():
    """Two guests through --app patch on two workers: each worker polls one
    guest and delivers into the other's RX ring, which the other worker
    also maps (shared, locked). Worker 0 is SIGKILLed ten times under ping
    (tests/test_guests.py's ride-out): its locks are released, the rings go
    on, at least 90% of the pings return and the links stay up."""
    from tests.test_guests import Pair, ride_out_worker_kills
    p = Pair(vhu_args=("--workers", 2)).start()
    try:
        deadline = time.monotonic() + 30
        while True:                  # the stats file is written every 0.2 s
            pollers = [q["worker"] for port in p.vhu.stats()["ports"] for q in port["queues"]]
            if None not in pollers or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert sorted(pollers, key=str) == [0, 1], pollers
        ride_out_worker_kills(p)
    finally:
        p.close()
