#!/usr/bin/env python3
"""Is it QEMU? Migrate a guest between two vhost-user ports of DPDK testpmd's
vhost PMD (the reference back-end, not vhu) and see whether the destination
guest's kernel survives.

On this project's machines (QEMU 7.2, TCG, Debian's 6.1 guest kernel) a
migrated guest's kernel sometimes crashes within seconds of resuming on the
destination (slab, hrtimer, RCU or runqueue corruption in per-CPU data),
with vhu or with testpmd as the back-end alike: on 2026-12-02, 2 of 2
two-vCPU guests and 1 of 4 one-vCPU guests with testpmd. Two-vCPU guests
crash far more often, so tests/test_migration.py runs one-vCPU guests (with
two queue pairs through ethtool). Run this again on a newer QEMU to see
whether the defect is gone.

    python scripts/qemu-smp-migration-check.py --runs 4 --smp 2 [--packed]

Exit status 0 when no destination guest crashed, 1 otherwise. Needs
scripts/setup-peers.sh (testpmd, QEMU, the guest kernel and busybox).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from vhu.testbed.guest import Guest  # noqa: E402

def testpmd(d, run):
    """testpmd with two vhost-user server ports a.sock and b.sock, sending
    64-byte frames into both (txonly), so the guest receives the whole time."""
    proc = subprocess.Popen(
        ["dpdk-testpmd", "--no-pci", "--no-huge", "-m", "1024", "--file-prefix", f"smpcheck{run}",
         "-l", "0,1", "--main-lcore", "1",
         "--vdev", f"net_vhost0,iface={d}/a.sock,queues=1",
         "--vdev", f"net_vhost1,iface={d}/b.sock,queues=1",
         "--", "--forward-mode=txonly", "--auto-start", "--stats-period=0", "--txpkts=64",
         "--burst=4"],
        stdin=subprocess.PIPE, stdout=open(f"{d}/testpmd.log", "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not all(os.path.exists(f"{d}/{s}") for s in ("a.sock", "b.sock")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"testpmd did not start: see {d}/testpmd.log")
        time.sleep(0.2)
    return proc


def one(run, smp, packed, keep):
    d = tempfile.mkdtemp(prefix="smpcheck-")
    tp = testpmd(d, run)
    kw = dict(smp=smp, ip="10.0.0.1/24", qmp=True, cpu=1, packed=packed)
    src = dst = None
    try:
        src = Guest(f"{d}/a.sock", name="smpcheck-src", log_path=f"{d}/src.console", **kw).launch()
        src.wait_ready(300)
        src.run("(while true; do dd if=/dev/urandom of=/tmp/x bs=65536 count=16 2>/dev/null; "
                "md5sum /tmp/x > /dev/null; done) > /dev/null 2>&1 &")
        src.run("(while true; do ping -c 20 -i 0.05 10.0.0.2 > /dev/null 2>&1; done) &")
        uri = f"unix:{d}/mig.sock"
        dst = Guest(f"{d}/b.sock", name="smpcheck-dst", log_path=f"{d}/dst.console",
                    incoming=uri, **kw).launch()
        deadline = time.monotonic() + 60
        while dst.qmp("query-status", timeout=10)["status"] != "inmigrate":
            if time.monotonic() > deadline:
                raise RuntimeError("the destination never waited for the migration")
            time.sleep(0.2)
        info = src.migrate(uri, timeout=300)
        src.close()
        deadline = time.monotonic() + 60
        while dst.qmp("query-status", timeout=10)["status"] != "running":
            if time.monotonic() > deadline:
                raise RuntimeError("the destination did not run")
            time.sleep(0.2)
        # The crashes come within seconds; give the guest some to show one.
        time.sleep(10)
        try:
            _, rc = dst.run("echo alive", timeout=30)
        except Exception:
            rc = -1
    finally:
        for g in (src, dst):
            if g is not None:
                g.close()
        tp.terminate()
        tp.wait(30)
    crashed = rc != 0 or dst.kernel_crash() is not None
    if crashed and keep:
        shutil.copy(f"{d}/dst.console", os.path.join(keep, f"smpcheck-{run}.console"))
    shutil.rmtree(d, ignore_errors=True)
    print(f"run {run}: downtime {info.get('downtime')} ms: "
          f"{'destination guest CRASHED' if crashed else 'destination guest fine'}", flush=True)
    return crashed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--smp", type=int, default=2)
    ap.add_argument("--packed", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="copy crashed guests' consoles here")
    a = ap.parse_args()
    crashed = sum(one(r, a.smp, a.packed, a.keep) for r in range(a.runs))
    print(f"{crashed} of {a.runs} destination guests crashed (testpmd vhost back-end, "
          f"smp={a.smp}, {'packed' if a.packed else 'split'} rings)")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
