"""An exact emulation of the Vapp reference client (`vhost -q PATH`,
github.com/virtualopensystems/vapp), for tests (CI cannot fetch and build it).

What the real client does, as seen on the wire and in its shared memory
against vhu.master (and in its source: vhost_client.c, vring.c, client.c):

- Memory first, before it connects: two regions (one per ring) of
  ALIGN(sizeof(struct vhost_vring) + 1528 * 32768, 1 MiB) = 51 380 224 bytes,
  each a shm file mapped once; region i starts with ring i's
  `struct vhost_vring`: two ints (kickfd, callfd), the descriptor table at
  +8, the avail ring right after it at +524 296 (aligned(2)), the used ring
  at +593 920 (aligned(4096)); the packet buffers follow the struct, at
  +860 160 + 1528 * k (8-aligned), one per descriptor. Every descriptor is
  pre-set to its buffer: len 1528, flags WRITE, next k + 1 (the last 0xffff).
- Messages, header flags 0x1 (version 1, never NEED_REPLY): SET_OWNER;
  GET_FEATURES (waits for the reply); SET_MEM_TABLE (72 bytes: 2 regions,
  2 fds, guest_phys_addr == userspace_addr == its mapping's address,
  mmap_offset 0); then for ring 0, then ring 1: SET_VRING_NUM 32768,
  SET_VRING_BASE 0, SET_VRING_KICK (fd), SET_VRING_CALL (fd), and
  SET_VRING_ADDR last (desc +8, used +593 920, avail +524 296, log 0,
  flags 0). Never SET_FEATURES, GET_PROTOCOL_FEATURES, SET_VRING_ENABLE.
- Then once a second: it takes back the used TX chains (ring 1), pushing
  each descriptor back on its free list (len 1528, flags |= WRITE), and
  sends one 60-byte ARP request (broadcast, from 01:02:03:04:05:06, who has
  192.168.0.1 tell 192.168.0.2) as one descriptor of 70 bytes: a zeroed
  10-byte virtio_net_hdr and the frame, flags 0, next 0xffff; the head goes
  into avail->ring[avail->idx % 32768], avail->idx is incremented (no
  barriers) and ring 1's kick eventfd is written. The free list starts at 0
  and a freed descriptor goes back on top, so with a back-end that keeps up
  every frame goes out in descriptor 0.
- It never makes a receive buffer available on ring 0 (its avail->idx stays 0).
- On SIGINT: RESET_OWNER, its mappings go, then the socket is closed.

Real runs with vhu's --app sink and --app echo: frames counted one per
second, each used (used->idx == avail->idx, element (0, 0)), and with echo
every frame dropped as rx_no_room.
"""
import mmap
import os
import select
import socket
import struct
import time

import numpy as np

from vhu.protocol.messages import (
    HEADER, VERSION, MemoryRegion, MemoryTable, Request as R, U64, VringAddr, VringState,
)

RING_SIZE = 32768                     # VHOST_VRING_SIZE
BUFFER_SIZE = 10 + 1518               # sizeof(struct virtio_net_hdr) + ETH_PACKET_SIZE
VRING_STRUCT = 860_160                # sizeof(struct vhost_vring) with 32768 entries
REGION_SIZE = (VRING_STRUCT + BUFFER_SIZE * RING_SIZE + (1 << 20) - 1) // (1 << 20) * (1 << 20)
DESC_OFF, AVAIL_OFF, USED_OFF = 8, 524_296, 593_920
BUF_OFF = VRING_STRUCT                # ALIGN(ptr, 8) of the first buffer: already aligned
HDR_LEN = 10
RX, TX = 0, 1
F_WRITE = 2
NO_NEXT = 0xFFFF
# The addresses its two mappings got in a real run (the second lies below the first).
REGION_ADDRS = (0x7F41_E6FB_F000, 0x7F41_E3EB_F000)

ARP_REQUEST = bytes.fromhex(
    "ffffffffffff" "010203040506" "0806"           # broadcast, from 01:02:03:04:05:06, ARP
    "0001" "0800" "06" "04" "0001"                 # Ethernet, IPv4, request
    "010203040506" "c0a80002"                      # sender 192.168.0.2
    "000000000000" "c0a80001") + bytes(18)         # target 192.168.0.1, padding to 60
assert len(ARP_REQUEST) == 60 and REGION_SIZE == 51_380_224


class VappClient:
    """The real client's behaviour (module docstring). `send_arp()` is one turn
    of its once-a-second loop; `run(seconds)` paces turns as it does."""

    def __init__(self, path, name="vhu-vapp", timeout=10.0):
        self.fds, self.maps = [], []
        self.kicks, self.calls = {}, {}
        self.sent = 0
        self.free_head = 0            # TX ring's free list (vring.c: last_avail_idx)
        self.last_used = 0
        try:
            for i in range(2):        # new_vhost_client: regions and rings before connecting
                fd = os.memfd_create(f"{name}-{i}", os.MFD_CLOEXEC)
                self.fds.append(fd)
                os.ftruncate(fd, REGION_SIZE)
                self.maps.append(mmap.mmap(fd, REGION_SIZE))
                self._new_vring(i)
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(path)
            self._send(R.SET_OWNER)
            self._send(R.GET_FEATURES)
            self.features = U64.unpack(self._reply(R.GET_FEATURES)).value
            table = MemoryTable(tuple(MemoryRegion(a, REGION_SIZE, a, 0) for a in REGION_ADDRS))
            self._send(R.SET_MEM_TABLE, table.pack(), self.fds)
            for i in (RX, TX):        # set_host_vring_table, ring 0 then ring 1
                self.kicks[i] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self.calls[i] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                struct.pack_into("<ii", self.maps[i], 0, self.kicks[i], self.calls[i])
                base = REGION_ADDRS[i]
                self._send(R.SET_VRING_NUM, VringState(i, RING_SIZE).pack())
                self._send(R.SET_VRING_BASE, VringState(i, 0).pack())
                self._send(R.SET_VRING_KICK, U64(i).pack(), [self.kicks[i]])
                self._send(R.SET_VRING_CALL, U64(i).pack(), [self.calls[i]])
                self._send(R.SET_VRING_ADDR, VringAddr(i, 0, base + DESC_OFF, base + USED_OFF,
                                                       base + AVAIL_OFF, 0).pack())
        except BaseException:
            self.close(reset=False)
            raise

    # -- wire (client.c vhost_ioctl: one sendmsg per message, flags 0x1) -------------

    def _send(self, request, payload=b"", fds=()):
        data = HEADER.pack(int(request), VERSION, len(payload)) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def _recv_exact(self, n):
        out = b""
        while len(out) < n:
            more = self.sock.recv(n - len(out))
            if not more:
                raise EOFError("back-end closed the connection")
            out += more
        return out

    def _reply(self, request):
        req, flags, size = HEADER.unpack(self._recv_exact(HEADER.size))
        assert req == int(request) and flags & 3 == VERSION, (req, flags)
        return self._recv_exact(size)

    # -- rings (vring.c) ----------------------------------------------------------------

    def _new_vring(self, i):
        m, base = self.maps[i], REGION_ADDRS[i]
        descs = bytearray(16 * RING_SIZE)
        for k in range(RING_SIZE):
            struct.pack_into("<QIHH", descs, 16 * k, base + BUF_OFF + BUFFER_SIZE * k,
                             BUFFER_SIZE, F_WRITE, k + 1)
        struct.pack_into("<H", descs, 16 * (RING_SIZE - 1) + 14, NO_NEXT)
        m[DESC_OFF:DESC_OFF + len(descs)] = descs
        struct.pack_into("<H", m, AVAIL_OFF + 2, 0)
        struct.pack_into("<H", m, USED_OFF + 2, 0)

    def offset(self, ring, addr):
        """Offset in ring's region of one of its addresses (gpa == uva)."""
        off = addr - REGION_ADDRS[ring]
        assert 0 <= off < REGION_SIZE, hex(addr)
        return off

    def desc(self, ring, k):
        """(addr, len, flags, next) of descriptor k."""
        return struct.unpack_from("<QIHH", self.maps[ring], DESC_OFF + 16 * k)

    def set_desc(self, ring, k, addr, length, flags, nxt):
        struct.pack_into("<QIHH", self.maps[ring], DESC_OFF + 16 * k, addr, length, flags, nxt)

    def avail_idx(self, ring):
        return struct.unpack_from("<H", self.maps[ring], AVAIL_OFF + 2)[0]

    def used_idx(self, ring):
        return struct.unpack_from("<H", self.maps[ring], USED_OFF + 2)[0]

    def used_elem(self, ring, pos):
        return struct.unpack_from("<II", self.maps[ring], USED_OFF + 4 + 8 * (pos % RING_SIZE))

    def make_available(self, ring, head):
        """put_vring's last step: the head into avail->ring, avail->idx + 1."""
        m, idx = self.maps[ring], self.avail_idx(ring)
        struct.pack_into("<H", m, AVAIL_OFF + 4 + 2 * (idx % RING_SIZE), head)
        # One 16-bit store, as the C client's avail->idx++ is: struct.pack_into
        # writes byte by byte, and the device could read a torn index (seen:
        # 0x00ff -> 0x0000 -> 0x0100, a jump of 65 281, breaking the ring).
        np.frombuffer(m, np.uint16, 1, AVAIL_OFF + 2)[0] = (idx + 1) & 0xFFFF

    def kick(self, ring):
        os.eventfd_write(self.kicks[ring], 1)

    def process_used(self):
        """process_used_vring(TX): each used descriptor back on top of the free list."""
        used = self.used_idx(TX)
        while self.last_used != used:
            head = self.used_elem(TX, self.last_used)[0]
            assert 0 <= head < RING_SIZE, head
            _, _, flags, _ = self.desc(TX, head)
            addr = self.desc(TX, head)[0]
            self.set_desc(TX, head, addr, BUFFER_SIZE, flags | F_WRITE, self.free_head)
            self.free_head = head
            self.last_used = (self.last_used + 1) % RING_SIZE

    def put(self, frame):
        """put_vring(TX): the frame after a zeroed header in the free head's buffer."""
        head = self.free_head
        addr, length, _, nxt = self.desc(TX, head)
        assert HDR_LEN + len(frame) <= length
        self.free_head = nxt
        off = self.offset(TX, addr)
        self.maps[TX][off:off + HDR_LEN + len(frame)] = bytes(HDR_LEN) + frame
        self.set_desc(TX, head, addr, HDR_LEN + len(frame), 0, NO_NEXT)
        self.make_available(TX, head)
        return head

    def send_arp(self):
        """One turn of poll_client: reclaim, send the ARP request, kick ring 1."""
        self.process_used()
        head = self.put(ARP_REQUEST)
        self.kick(TX)
        self.sent += 1
        return head

    def run(self, seconds):
        """The client's own pace: a frame now and one each second after."""
        deadline = time.monotonic() + seconds
        while True:
            self.send_arp()
            if time.monotonic() + 1.0 > deadline:
                return self.sent
            time.sleep(1.0)

    def wait_used(self, timeout=15.0):
        """Wait until the back-end has used every frame sent (used->idx == avail->idx)."""
        deadline = time.monotonic() + timeout
        while self.used_idx(TX) != self.avail_idx(TX) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.used_idx(TX) == self.avail_idx(TX)

    def wait_closed(self, timeout=10.0):
        """True once the back-end has closed the connection (an observation;
        the real client would only notice at its next message)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.sock], [], [], 0.1)[0]:
                try:
                    if not self.sock.recv(4096):
                        return True
                except ConnectionResetError:
                    return True
        return False

    # -- exit (end_vhost_client) --------------------------------------------------------

    def close(self, reset=True):
        """RESET_OWNER, unmap and close the regions, close the socket."""
        sock = getattr(self, "sock", None)
        if reset and sock is not None:
            try:
                self._send(R.RESET_OWNER)
            except OSError:
                pass
        for m in self.maps:
            try:
                m.close()
            except BufferError:
                pass
        for fd in self.fds + list(self.kicks.values()) + list(self.calls.values()):
            os.close(fd)
        self.maps, self.fds, self.kicks, self.calls = [], [], {}, {}
        if sock is not None:
            sock.close()
            self.sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
