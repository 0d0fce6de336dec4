"""Instructions per packet of the ring core, logging off and on (callgrind: load-independent).

    python perf/callgrind_log.py [--base DIR] [--packets 100000]

vhu._ring.bench_roundtrip (the driver refills single-descriptor 64-byte
buffers, the device pops a batch of 32, pushes them used and publishes once
per batch; the pop and publish paths the dirty log hooks into) runs under
`valgrind --tool=callgrind` twice, with N and 2N packets; the difference of
the instruction counts over N is the cost per packet, without start-up.
Rows: this checkout with logging off, with logging on (a log over all guest
memory, VHOST_VRING_F_LOG), and --base DIR (another checkout built in
place) with no logging at all: "off" against "base" is what logging costs
when no migration runs.
"""
import argparse
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SNIPPET = r"""
import os, sys
from vhu._mem import GuestMemory
from vhu._ring import DeviceRing, DriverRing, bench_roundtrip
packed, log, n = sys.argv[1] == "packed", sys.argv[2] == "on", int(sys.argv[3])
size, total = 256, 4 << 20
fd = os.memfd_create("vhu-cg")
os.ftruncate(fd, total)
drv_mem, dev_mem = GuestMemory(), GuestMemory()
for m in (drv_mem, dev_mem):
    m.set_table([(fd, 0, total, 0x7F0000000000, 0)])
desc, avail, used, bufs = 0x0, 0x80000, 0x90000, 0x100000
drv = DriverRing(drv_mem, size, desc, avail, used, packed=packed)
dev = DeviceRing(dev_mem, size, desc, avail, used, addr_space="gpa", packed=packed)
if packed:
    dev.last_avail_idx = 0x8000
if log:
    buf = bytearray(total // 4096 // 8)
    dev.set_log(buf, 0, len(buf), log_used=True, used_gpa=used)
assert bench_roundtrip(drv, dev, bufs, 64, n, 32, 2048) == n
"""


def instructions(tree, ring, log, packets):
    env = dict(os.environ, PYTHONPATH=tree, PYTHONHASHSEED="0")
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", SNIPPET, ring, log, str(packets)],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    m = re.search(r"Collected\s*:\s*(\d+)", out.stderr)
    if out.returncode or not m:
        raise RuntimeError(f"{tree} {ring} {log}: {out.stderr[-2000:]}")
    return int(m.group(1))


def per_packet(tree, ring, log, packets):
    small = instructions(tree, ring, log, packets)
    large = instructions(tree, ring, log, 2 * packets)
    return (large - small) / packets


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, metavar="DIR")
    ap.add_argument("--packets", type=int, default=1_000_000)
    ap.add_argument("--rings", default="split,packed")
    a = ap.parse_args(argv)
    print(f"{'ring':7} {'base':>8} {'off':>8} {'on':>8}   instructions per packet")
    for ring in a.rings.split(","):
        base = per_packet(a.base, ring, "off", a.packets) if a.base else None
        off = per_packet(REPO, ring, "off", a.packets)
        on = per_packet(REPO, ring, "on", a.packets)
        print(f"{ring:7} {base if base is not None else float('nan'):8.1f} {off:8.1f} {on:8.1f}",
              flush=True)


if __name__ == "__main__":
    main()
