"""A hostile front-end with real rings: negotiates like QEMU (VERSION_1,
PROTOCOL_FEATURES, REPLY_ACK), shares a memfd, sets up split rings 0 (RX)
and 1 (TX) with eventfds, and then does whatever a test tells it to, over
a raw socket (tests.test_master_hostile.Frontend) and its own driver side
(vhu._ring.DriverRing over its own mapping of the memfd)."""
import os
import time

from tests.test_master_hostile import Frontend, mem_table, memfd
from vhu._mem import GuestMemory
from vhu._ring import DriverRing
from vhu.protocol.messages import Request as R, U64, VringAddr, VringState

UVA = 0x7F00_0000_0000
MEM_SIZE = 4 << 20
RING_SIZE = 256
HDR = 12
BUF_BASE = 0x100000
BUF_SIZE = 2048


class RingFrontend:
    def __init__(self, path, *, call_fd=None, kick_fd=None, name="vhu-rawfront"):
        self.fe = Frontend(path).negotiate()
        self.fd = memfd(MEM_SIZE, name)
        self.mem = GuestMemory()
        self.mem.set_table([(self.fd, 0, MEM_SIZE, UVA, 0)])
        self.drivers, self.kicks, self.calls = {}, {}, {}
        fe = self.fe
        assert fe.ack(R.SET_MEM_TABLE, mem_table((0, MEM_SIZE, UVA, 0)), fds=[self.fd]) == 0
        for i in (0, 1):
            desc, avail, used = self.ring_gpas(i)
            self.drivers[i] = DriverRing(self.mem, RING_SIZE, desc, avail, used)
            self.kicks[i] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.calls[i] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            assert fe.ack(R.SET_VRING_NUM, VringState(i, RING_SIZE).pack()) == 0
            assert fe.ack(R.SET_VRING_ADDR,
                          VringAddr(i, 0, UVA + desc, UVA + used, UVA + avail, 0).pack()) == 0
            assert fe.ack(R.SET_VRING_BASE, VringState(i, 0).pack()) == 0
            assert fe.ack(R.SET_VRING_KICK, U64(i).pack(),
                          fds=[kick_fd if kick_fd is not None and i == 1 else self.kicks[i]]) == 0
            assert fe.ack(R.SET_VRING_CALL, U64(i).pack(),
                          fds=[call_fd if call_fd is not None and i == 1 else self.calls[i]]) == 0
            assert fe.ack(R.SET_VRING_ENABLE, VringState(i, 1).pack()) == 0
        self.sent = 0
        self.rx_slots = {}

    @staticmethod
    def ring_gpas(i):
        base = 0x10000 + i * 0x4000
        return base, base + 0x1000, base + 0x2000

    def send(self, frames):
        """Frames on the TX ring (ring 1), one descriptor each, and a kick."""
        drv = self.drivers[1]
        for f in frames:
            gpa = BUF_BASE + (drv.avail_idx % RING_SIZE) * BUF_SIZE
            self.mem.write(gpa, bytes(HDR) + f)
            drv.add([(gpa, HDR + len(f))])
        drv.publish()
        os.eventfd_write(self.kicks[1], 1)
        self.sent += len(frames)

    def resend(self, n, length):
        """n frames of `length` bytes from the TX buffers as they are now
        (not written again: whatever the guest left or is changing there)."""
        drv = self.drivers[1]
        for _ in range(n):
            gpa = BUF_BASE + (drv.avail_idx % RING_SIZE) * BUF_SIZE
            drv.add([(gpa, HDR + length)])
        drv.publish()
        os.eventfd_write(self.kicks[1], 1)
        self.sent += n

    def send_chain(self, ndesc, page=4096):
        """One TX chain of ndesc descriptors, all on the same page."""
        gpa = BUF_BASE
        self.mem.write(gpa, bytes(HDR) + bytes(range(256)) * (page // 256 - 1))
        self.drivers[1].add([(gpa, page)] * ndesc)
        self.drivers[1].publish()
        os.eventfd_write(self.kicks[1], 1)

    def post_rx(self, n):
        """n receive buffers on the RX ring (ring 0)."""
        drv = self.drivers[0]
        for _ in range(n):
            gpa = BUF_BASE + (RING_SIZE + drv.avail_idx % RING_SIZE) * BUF_SIZE
            self.rx_slots[drv.add([], [(gpa, BUF_SIZE)])] = gpa
        drv.publish()
        os.eventfd_write(self.kicks[0], 1)

    def top_up_rx(self, n):
        """Post receive buffers until n are outstanding."""
        if len(self.rx_slots) < n:
            self.post_rx(n - len(self.rx_slots))

    def received(self):
        """Frames that arrived in RX buffers since the last call (header stripped)."""
        out = []
        for head, length in self.drivers[0].get_used():
            out.append(self.mem.read(self.rx_slots.pop(head), length)[HDR:])
        return out

    def wait_used(self, n, timeout=15.0):
        got, deadline = 0, time.monotonic() + timeout
        while got < n and time.monotonic() < deadline:
            got += len(self.drivers[1].get_used())
            if got < n:
                time.sleep(0.005)
        return got

    def toggle(self, ring, enable, need_reply=False):
        self.fe.send(R.SET_VRING_ENABLE, VringState(ring, 1 if enable else 0).pack(),
                     need_reply=need_reply)

    def close(self):
        self.fe.close()
        for fd in [self.fd, *self.kicks.values(), *self.calls.values()]:
            os.close(fd)
        self.drivers.clear()
        self.mem.clear()
