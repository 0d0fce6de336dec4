"""Self-demonstration of the compiled core (until the back-end's main job exists).

A driver and a device share a memfd-backed "guest" the way a front-end and
vhu do: the driver side maps the memory for itself, the device side gets the
fd and maps it again. Frames go through a TX ring and back through an RX ring
(virtio-net header, mergeable buffers), are checked byte for byte, then the
raw ring path is timed.

    python -m vhu.demo [--seconds 2]
"""
import argparse
import hashlib
import os
import sys
import time

from vhu._mem import GuestMemory
from vhu._ring import DeviceRing, DriverRing, bench_roundtrip

GUEST_BYTES = 16 << 20
VERSION_1, MRG_RXBUF = 1 << 32, 1 << 15


def shared_guest():
    fd = os.memfd_create("vhu-demo-guest")
    os.ftruncate(fd, GUEST_BYTES)
    driver_mem, device_mem = GuestMemory(), GuestMemory()
    region = (fd, 0, GUEST_BYTES, 0x7F0000000000, 0)
    driver_mem.set_table([region])
    device_mem.set_table([region])
    os.close(fd)
    return driver_mem, device_mem


def frames_roundtrip(driver_mem, device_mem, count=2000):
    """TX ring guest -> device, RX ring device -> guest; returns (frames, ok)."""
    features = VERSION_1 | MRG_RXBUF
    size = 256
    tx_drv = DriverRing(driver_mem, size, 0x0000, 0x1000, 0x2000, event_idx=True)
    tx_dev = DeviceRing(device_mem, size, 0x0000, 0x1000, 0x2000, addr_space="gpa",
                        event_idx=True, features=features)
    rx_drv = DriverRing(driver_mem, size, 0x4000, 0x5000, 0x6000, event_idx=True)
    rx_dev = DeviceRing(device_mem, size, 0x4000, 0x5000, 0x6000, addr_space="gpa",
                        event_idx=True, features=features)
    tx_buf, rx_buf, slot = 0x100000, 0x800000, 2048
    buffer_of = {}                    # rx head -> the buffer it carries
    for i in range(size):
        buffer_of[rx_drv.add([], [(rx_buf + i * slot, slot)])] = rx_buf + i * slot
    rx_drv.publish()
    sent = hashlib.sha256()
    received = hashlib.sha256()
    moved = 0
    for n in range(count):
        frame = os.urandom(60 + (n * 97) % 4000)
        sent.update(frame)
        gpa = tx_buf + (n % size) * 8192
        driver_mem.write(gpa, bytes(12) + frame)
        tx_drv.add([(gpa, 12 + len(frame))])
        tx_drv.publish()
        for f in tx_dev.tx_frames(32):
            assert rx_dev.rx_frames([f]) == 1, "no receive buffers"
        tx_dev.publish()
        rx_dev.publish()
        tx_drv.get_used()
        used = rx_drv.get_used()
        data = b"".join(driver_mem.read(buffer_of[h], ln) for h, ln in used)
        received.update(data[12:])
        for gpa in [buffer_of.pop(h) for h, _ in used]:
            buffer_of[rx_drv.add([], [(gpa, slot)])] = gpa
        rx_drv.publish()
        moved += 1
    return moved, sent.digest() == received.digest()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vhu.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="how long to time the ring path")
    args = ap.parse_args(argv)
    driver_mem, device_mem = shared_guest()
    moved, ok = frames_roundtrip(driver_mem, device_mem)
    print(f"virtio-net frames through TX and RX rings: {moved}, sha256 equal: {ok}")
    size = 256
    drv = DriverRing(driver_mem, size, 0x10000, 0x11000, 0x12000)
    dev = DeviceRing(device_mem, size, 0x10000, 0x11000, 0x12000, addr_space="gpa")
    packets, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        packets += bench_roundtrip(drv, dev, 0x200000, 64, 5_000_000, 32)
    dt = time.perf_counter() - t0
    print(f"ring path, 64-byte buffers, batch 32: {packets / dt / 1e6:.1f} Mpps "
          f"({dt / packets * 1e9:.1f} ns per packet, pop + used push + driver refill)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
