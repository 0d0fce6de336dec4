"""Core ring path benchmark (pyperf): ns per packet for device pop + used push.

The driver side keeps a split (or packed) ring full of single-descriptor 64-byte buffers
and takes used ones back, in the same process; the device side pops them in
batches, pushes them used and publishes used->idx once per batch. One pyperf
"loop" is one packet, so the reported time is per packet.

    python perf/bench_ring.py -o perf/ring.json [--fast]
    python -m pyperf stats perf/ring.json
"""
import os
import time

import pyperf

from vhu import _ring
from vhu._mem import GuestMemory
from vhu._ring import DeviceRing, DriverRing, bench_roundtrip

GUEST_BYTES = 4 << 20


def make_pair(ring_size, event_idx, packed=False):
    fd = os.memfd_create("vhu-bench-guest")
    os.ftruncate(fd, GUEST_BYTES)
    driver_mem, device_mem = GuestMemory(), GuestMemory()
    for mem in (driver_mem, device_mem):
        mem.set_table([(fd, 0, GUEST_BYTES, 0x7F0000000000, 0)])
    os.close(fd)
    desc, avail, used = 0x0, 0x80000, 0x90000
    drv = DriverRing(driver_mem, ring_size, desc, avail, used, event_idx=event_idx,
                     packed=packed)
    dev = DeviceRing(device_mem, ring_size, desc, avail, used, addr_space="gpa",
                     event_idx=event_idx, packed=packed)
    return drv, dev


def ring_path(loops, ring_size, batch, pkt_size, event_idx, packed=False):
    drv, dev = make_pair(ring_size, event_idx, packed)
    bench_roundtrip(drv, dev, 0x100000, pkt_size, 100_000, batch)    # warm caches
    t0 = time.perf_counter()
    moved = bench_roundtrip(drv, dev, 0x100000, pkt_size, loops, batch)
    dt = time.perf_counter() - t0
    assert moved >= loops, f"ring stalled after {moved} packets"
    return dt * loops / moved


def main():
    runner = pyperf.Runner()
    runner.metadata["vhu_build"] = "debug" if _ring.DEBUG_BUILD else "release"
    for packed, ring_size, batch, event_idx in [(False, 256, 32, False), (False, 256, 32, True),
                                                (False, 1024, 64, False), (True, 256, 32, False),
                                                (True, 256, 32, True)]:
        kind = "packed" if packed else "split"
        name = f"{kind}-ring pop+push 64B batch{batch} ring{ring_size}" + (" event_idx" if event_idx else "")
        runner.metadata.update({"frame_size": 64, "batch": batch, "ring_size": ring_size,
                                "event_idx": event_idx, "ring": kind,
                                "poll_mode": "none (in-process)"})
        runner.bench_time_func(name, ring_path, ring_size, batch, 64, event_idx, packed,
                               inner_loops=1)


if __name__ == "__main__":
    main()
