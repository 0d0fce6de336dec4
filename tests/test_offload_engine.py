"""Offloads through the worker engine (the driver side in-process, as in
tests/test_apps_engine.py): a guest's TSO and partial-checksum frames go to
a receiver as they are where it negotiated GUEST_TSO/GUEST_CSUM, and are
segmented or finished by vhu where it did not; headers that lie are
dropped and counted (tx_bad_offload); a stage sees the header fields."""
import os
import struct

import dpkt
import numpy as np
import pytest

from tests.test_offload import ACK, FIN, PSH, assert_l4_checksum, build
from tests.test_worker import FEATURES, UVA, Guest
from vhu._mem import GuestMemory
from vhu._ring import DeviceRing
from vhu.workers import _offload as off
from vhu.workers._engine import Engine

SIZE = 64 << 20
CSUM, GUEST_CSUM, GUEST_TSO4, GUEST_TSO6, GUEST_ECN = 1 << 0, 1 << 1, 1 << 7, 1 << 8, 1 << 9
HOST_TSO4, HOST_TSO6, HOST_ECN = 1 << 11, 1 << 12, 1 << 13
ALL = CSUM | GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | HOST_TSO4 | HOST_TSO6 | HOST_ECN
TX_SLOT, BIG_SLOT, SMALL_SLOT = 0x10100, 0x10100, 2048
NEEDS_CSUM, TCPV4, TCPV6 = off.NEEDS_CSUM, off.GSO["tcpv4"], off.GSO["tcpv6"]


def vnet(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return struct.pack("<BBHHHH", flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


class Net:
    """Ports on one engine, port p = the test guest's queue pair p, each with
    the offload features it "negotiated"."""

    def __init__(self, engine, features, small_rx=(), peers=None):
        self.g = Guest(SIZE)
        self.engine = engine
        self.mem = GuestMemory()
        self.mem.set_table([(self.g.fd, 0, SIZE, UVA, 0)])
        self.drivers, self.pairs, self.slots = [], [], {}
        for p, f in enumerate(features):
            (rx, rxs), (tx, txs) = self.g.rings(p)
            ring = lambda s: DeviceRing(self.mem, s.size, s.desc, s.avail, s.used,  # noqa: E731
                                        event_idx=s.event_idx, features=FEATURES | f)
            self.pairs.append(dict(rx=ring(rxs), tx=ring(txs), port=p, queue=0,
                                   features=FEATURES | f,
                                   peer=-1 if peers is None else peers[p]))
            self.drivers.append((rx, tx))
            self.post(p, 128, SMALL_SLOT if p in small_rx else BIG_SLOT)
        engine.set_bindings(self.pairs)

    def post(self, p, n, slot):
        rx = self.drivers[p][0]
        base = 0x1800000 + p * 0xC00000
        assert n * slot <= 0xC00000
        for i in range(n):
            gpa = base + i * slot
            self.slots[(p, rx.add([], [(gpa, slot)]))] = gpa
        rx.publish()

    def send(self, p, frames):
        """frames: (10-byte header, frame) pairs, on port p's TX ring."""
        tx = self.drivers[p][1]
        for i, (h, f) in enumerate(frames):
            gpa = 0x800000 + p * 0x400000 + i * TX_SLOT
            self.g.mem.write(gpa, h + b"\0\0" + f)
            tx.add([(gpa, 12 + len(f))])
        tx.publish()
        self.engine.run(0.05)
        assert len(tx.get_used()) == len(frames)

    def received(self, p):
        """(10-byte header, frame) of each frame in port p's RX ring, mergeable
        buffers joined as num_buffers says."""
        rx = self.drivers[p][0]
        used = [self.g.mem.read(self.slots.pop((p, head)), length)
                for head, length in rx.get_used()]
        out = []
        while used:
            first = used.pop(0)
            n = struct.unpack_from("<H", first, 10)[0]
            assert 1 <= n <= len(used) + 1
            out.append((first[:10], first[12:] + b"".join(used[:n - 1])))
            del used[:n - 1]
        return out

    def stats(self, p, ring):
        return self.pairs[p][ring].stats

    def close(self):
        self.g.close()


@pytest.fixture
def nets():
    made = []

    def make(*a, **kw):
        made.append(Net(*a, **kw))
        return made[-1]
    yield make
    for n in made:
        n.close()


def tso_frame(v6=False, size=60000, flags=ACK | PSH | FIN, dst=bytes.fromhex("525400000002")):
    frame, start, coff = build(v6, 6, bytes(i * 7 & 0xFF for i in range(size)), flags=flags,
                               tcp_opts=b"\x01\x01\x08\x0a" + bytes(8))
    frame = dst + frame[6:]
    h = vnet(NEEDS_CSUM, TCPV6 if v6 else TCPV4, start + 32, 1448, start, coff)
    return h, frame, start


@pytest.mark.parametrize("v6", [False, True])
def test_tso_frame_is_segmented_for_a_port_without_tso(nets, v6):
    net = nets(Engine(app="patch", poll="busy"), [ALL, 0], small_rx=(1,), peers=[1, 0])
    h, frame, start = tso_frame(v6)
    net.send(0, [(h, frame)])
    got = net.received(1)
    assert got and len(got) == -(-(len(frame) - start - 32) // 1448)
    payload = b""
    for k, (hdr, seg) in enumerate(got):
        assert hdr == bytes(10)                          # plain frames: nothing left to do
        assert len(seg) <= start + 32 + 1448
        assert_l4_checksum(seg, v6, 6)
        tcp = dpkt.ethernet.Ethernet(seg).data.data
        assert (tcp.flags & (FIN | PSH)) == (0 if k < len(got) - 1 else FIN | PSH)
        payload += tcp.data
    assert payload == frame[start + 32:]
    assert net.stats(0, "tx")["tx_gso"] == 1 and net.stats(0, "tx")["tx_frames"] == 1
    rx = net.stats(1, "rx")
    assert rx["rx_segmented"] == 1 and rx["rx_frames"] == len(got) and rx["rx_gso"] == 0
    assert rx["rx_no_room"] == 0


def test_tso_frame_passes_whole_to_a_port_with_tso(nets):
    net = nets(Engine(app="patch", poll="busy"), [ALL, ALL], peers=[1, 0])
    h, frame, start = tso_frame()
    net.send(0, [(h, frame)])
    assert net.received(1) == [(off.header_out(frame, NEEDS_CSUM, TCPV4, 1448, start, 16), frame)]
    assert net.stats(1, "rx")["rx_gso"] == 1 and net.stats(1, "rx")["rx_segmented"] == 0


def test_tso_over_small_mergeable_buffers(nets):
    """Passed on into mergeable 2 KiB buffers: one frame over many (num_buffers)."""
    net = nets(Engine(app="patch", poll="busy"), [ALL, ALL], small_rx=(1,), peers=[1, 0])
    h, frame, start = tso_frame(size=20000)
    net.send(0, [(h, frame)])
    got = net.received(1)
    assert len(got) == 1 and got[0][1] == frame and got[0][0][1] == TCPV4


def test_partial_checksum_finished_or_passed(nets):
    net = nets(Engine(app="switch", poll="busy"), [ALL, 0, GUEST_CSUM])
    for proto in (6, 17):
        frame, start, coff = build(False, proto, b"z" * 999)
        frame = b"\xff" * 6 + frame[6:]                  # broadcast: flooded to both
        net.send(0, [(vnet(NEEDS_CSUM, 0, 0, 0, start, coff), frame)])
        (h1, f1), = net.received(1)
        assert h1 == bytes(10) and f1 != frame
        assert f1[:start + coff] == frame[:start + coff]
        assert_l4_checksum(f1, False, proto)
        assert net.received(2) == [(vnet(NEEDS_CSUM, 0, 0, 0, start, coff), frame)]
    assert net.stats(0, "tx")["tx_csum"] == 2
    assert net.stats(1, "rx")["rx_csum_done"] == 2 and net.stats(2, "rx")["rx_csum"] == 2


def test_flooded_tso_frame_follows_each_receivers_capability(nets):
    net = nets(Engine(app="switch", poll="busy"), [ALL, ALL, 0], small_rx=(2,))
    h, frame, start = tso_frame(dst=b"\xff" * 6, size=10000)
    net.send(0, [(h, frame)])
    assert [f for _, f in net.received(1)] == [frame]
    segs = net.received(2)
    assert len(segs) == 7 and b"".join(dpkt.ethernet.Ethernet(s).data.data.data
                                        for _, s in segs) == frame[start + 32:]


def test_lying_headers_are_dropped_and_counted(nets):
    net = nets(Engine(app="patch", poll="busy"), [CSUM, ALL, ALL], peers=[1, 0, 1])
    h, frame, start = tso_frame(size=5000)
    plain = b"\x52\x54\0\0\0\x02" + frame[6:200]
    bad = [
        (h, frame),                                                    # TSO4 not negotiated
        (vnet(NEEDS_CSUM, 0, 0, 0, len(plain) - 1, 0), plain),         # checksum past the end
        (vnet(0, 0), plain),                                           # fine
        (vnet(2, 0), plain),                                           # DATA_VALID: ignored
    ]
    net.send(0, bad)
    assert net.stats(0, "tx")["tx_bad_offload"] == 2
    assert [f for _, f in net.received(1)] == [plain, plain]
    # From a port with every offload: a zero MSS, and a TSO frame that is UDP.
    udp, us, uc = build(False, 17, b"u" * 3000)
    net.send(2, [(vnet(NEEDS_CSUM, TCPV4, 0, 0, start, 16), frame),
                 (vnet(NEEDS_CSUM, TCPV4, 0, 1448, us, uc), udp),
                 (vnet(NEEDS_CSUM, 99, 0, 1448, start, 16), frame),
                 (vnet(NEEDS_CSUM, off.GSO["udp"], 0, 1448, us, uc), udp)])
    assert net.stats(2, "tx")["tx_bad_offload"] == 4
    assert net.stats(2, "tx")["tx_frames"] == 0
    assert net.received(1) == []


def test_split_header_and_frame_are_copied_before_checking(nets):
    """A header split over descriptors, and a frame over many: checked and
    delivered from one private copy."""
    net = nets(Engine(app="patch", poll="busy"), [ALL, 0], small_rx=(1,), peers=[1, 0])
    h, frame, start = tso_frame(size=8000)
    whole = h + b"\0\0" + frame
    tx = net.drivers[0][1]
    cuts = [0, 1, 5, 12, 40, 3000, len(whole)]
    bufs = []
    for k in range(len(cuts) - 1):
        gpa = 0x800000 + k * 0x10000
        net.g.mem.write(gpa, whole[cuts[k]:cuts[k + 1]])
        bufs.append((gpa, cuts[k + 1] - cuts[k]))
    tx.add(bufs)
    tx.publish()
    net.engine.run(0.05)
    segs = net.received(1)
    assert len(segs) == 6 and b"".join(dpkt.ethernet.Ethernet(s).data.data.data
                                       for _, s in segs) == frame[start + 32:]


def test_stage_sees_the_header_fields(nets):
    seen = []

    def stage(meta, bufs):
        seen.append([(m["flags"], m["gso_type"], m["gso_size"], m["csum_start"], m["csum_offset"])
                     for m in meta])
        return None

    net = nets(Engine(app="patch", poll="busy", stage=stage), [ALL, 0], small_rx=(1,),
               peers=[1, 0])
    h, frame, start = tso_frame(size=3000)
    net.send(0, [(h, frame), (vnet(), frame[:100])])
    assert seen == [[(NEEDS_CSUM, TCPV4, 1448, start, 16), (0, 0, 0, 0, 0)]]
    got = net.received(1)
    assert len(got) == 3 + 1 and got[-1][1] == frame[:100]


def test_tap_gets_finished_frames(nets):
    """A TAP (no IFF_VNET_HDR here) takes no header: a TSO frame for it is
    segmented, a partial checksum finished."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
        net = nets(Engine(app="patch", poll="busy"), [ALL])
        net.pairs[0]["peer"] = 1
        counters = np.zeros(2 * len(net.stats(0, "rx")) + 2, np.uint64)
        net.pairs.append(dict(tap_fd=w, tap_counters=counters, port=1, queue=0, peer=0))
        net.engine.set_bindings(net.pairs)
        h, frame, start = tso_frame(size=4000)
        net.send(0, [(h, frame)])
        data = os.read(r, 1 << 20)
    finally:
        os.close(r)
        os.close(w)
    # A pipe has no frame boundaries; the three segments arrive back to back.
    assert len(data) == 3 * (start + 32) + 4000


def test_random_and_mutated_headers_never_break_anything(nets):
    """A hostile guest: random virtio_net_hdr fields on random bytes and on
    real TSO frames with a few header bytes mutated. Every frame is counted
    once (forwarded or tx_bad_offload), the port without offloads only ever
    gets plain frames, and every header the offload port gets passes the
    checks again for the frame it came with."""
    import random
    rnd = random.Random(15)
    net = nets(Engine(app="switch", poll="busy"), [ALL, ALL, 0], small_rx=(2,))
    sent = 0
    for _ in range(40):
        batch = []
        for _ in range(6):
            kind = rnd.random()
            if kind < 0.3:
                f = b"\xff" * 6 + bytes(rnd.getrandbits(8) for _ in range(rnd.randint(8, 300)))
                h = bytes(rnd.getrandbits(8) for _ in range(10))
            else:
                h, f, start = tso_frame(v6=rnd.random() < 0.5, size=rnd.randint(1, 5000),
                                        dst=b"\xff" * 6)
                f, h = bytearray(f), bytearray(h)
                for _ in range(rnd.randint(0, 3)):
                    if rnd.random() < 0.5:
                        f[rnd.randrange(12, min(len(f), 120))] = rnd.getrandbits(8)
                    else:
                        h[rnd.randrange(10)] = rnd.getrandbits(8)
                f, h = bytes(f), bytes(h)
            batch.append((h, f))
        net.send(0, batch)
        sent += len(batch)
        for hdr, frame in net.received(1):
            assert len(frame) <= 65535
            if hdr != bytes(10):
                flags, gso, _, size, cs, co = struct.unpack("<BBHHHH", hdr)
                assert off.check(frame, flags, gso, size, cs, co) == "ok", (hdr, frame[:80])
        for hdr, frame in net.received(2):
            assert hdr == bytes(10) and len(frame) <= 65535
    tx = net.stats(0, "tx")
    assert tx["tx_frames"] + tx["tx_bad_offload"] == sent
    assert tx["tx_bad_offload"] > 0 and tx["tx_gso"] > 0
    for p in range(3):
        assert not any(v for k, v in net.stats(p, "rx").items() if k.startswith("broken_"))
