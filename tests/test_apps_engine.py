"""Engine-level tests of the switch, pcap captures and Python pipeline stages,
with the driver side of the rings in-process (as tests/test_worker.py does):
each "port" is a queue pair of one test guest memory, bound as its own port."""
import os
import struct
import time

import dpkt
import numpy as np
import pytest

from tests.test_worker import GUEST, UVA, Guest
from vhu._mem import GuestMemory
from vhu.workers._engine import Engine
from vhu.workers.process import PCAP_HEADER

BCAST = b"\xff" * 6


def mac(n):
    return bytes([0x52, 0x54, 0, 0, 0, n])


def eth(dst, src, ethertype=0x0800, size=64, fill=0):
    return dst + src + struct.pack("!H", ethertype) + bytes([fill & 0xFF]) * (size - 14)


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


class Ports:
    """n ports on one engine; port p's rings are the test guest's queue pair p."""

    def __init__(self, engine, guest, n, captures=None):
        self.engine, self.g = engine, guest
        self.mem = GuestMemory()
        self.mem.set_table([(guest.fd, 0, GUEST, UVA, 0)])
        self.drivers, self.pairs = [], []
        for p in range(n):
            (rx, rxs), (tx, txs) = guest.rings(p)
            pair = dict(rx=guest.device_ring(self.mem, rxs), tx=guest.device_ring(self.mem, txs),
                        port=p, queue=0)
            if captures:
                pair["cap_rx"], pair["cap_tx"] = captures[p]
            self.pairs.append(pair)
            self.drivers.append((rx, tx))
            guest.post_rx(rx, p, 128)
        engine.set_bindings(self.pairs)

    def send(self, port, frames):
        self.g.send(self.drivers[port][1], port, frames)
        self.engine.run(0.02)
        assert len(self.drivers[port][1].get_used()) == len(frames)

    def received(self):
        return [self.g.received(rx, p) for p, (rx, _) in enumerate(self.drivers)]

    def stats(self, port, ring="tx"):
        return self.pairs[port][ring].stats


def test_switch_delivers_every_byte_around_its_head_copy(guest):
    """The switch decides on a private copy of a frame's first 64 bytes and
    delivers that copy and the rest of the guest's buffer (two pieces into
    one RX buffer): frames shorter than, as long as and longer than the
    head copy arrive byte for byte, unicast and flooded."""
    import random
    rnd = random.Random(14)
    engine = Engine(app="switch", poll="busy")
    ports = Ports(engine, guest, 3)
    ports.send(1, [eth(BCAST, mac(2))])                 # learn B on port 1
    ports.received()

    def frames(dst):
        return [dst + mac(1) + b"\x88\xb5" + bytes(rnd.randrange(256) for _ in range(n - 14))
                for n in (60, 63, 64, 65, 100, 1000, 1514)]
    unicast = frames(mac(2))
    ports.send(0, unicast)
    assert ports.received() == [[], unicast, []]
    flooded = frames(mac(9))
    ports.send(0, flooded)
    assert ports.received() == [[], flooded, flooded]


def test_switch_floods_learns_and_never_hairpins(guest):
    engine = Engine(app="switch", poll="busy")
    ports = Ports(engine, guest, 3)
    a = eth(BCAST, mac(1), fill=1)                  # A's broadcast: to B and C, not back to A
    ports.send(0, [a])
    assert ports.received() == [[], [a], [a]]
    b = eth(mac(1), mac(2), fill=2)                 # B to A, learned on port 0: only A
    ports.send(1, [b])
    assert ports.received() == [[b], [], []]
    c = eth(mac(9), mac(3), fill=3)                 # C to an unknown station: flooded
    ports.send(2, [c])
    assert ports.received() == [[c], [c], []]
    ab = eth(mac(2), mac(1), fill=4)                # A to B, both learned
    ca = eth(mac(1), mac(3), fill=5)
    ports.send(0, [ab, ab])
    ports.send(2, [ca])
    assert ports.received() == [[ca], [ab, ab], []]
    assert engine.mac_table() == {int.from_bytes(mac(i), "big"): i - 1 for i in (1, 2, 3)}
    # A station's frame to a MAC behind its own port is filtered, not sent back.
    ports.send(1, [eth(mac(2), mac(7))])            # learns 7 on port 1, dst 2 is on port 1
    assert ports.received() == [[], [], []]
    assert ports.stats(1)["drop_filtered"] == 1
    # Multicast is flooded too; a runt frame is dropped.
    m = eth(bytes.fromhex("01005e000001"), mac(1))
    ports.send(0, [m, b"\x00" * 10])
    assert ports.received() == [[], [m], [m]]
    assert ports.stats(0)["drop_filtered"] == 1
    assert ports.stats(0)["tx_frames"] == 5


def test_switch_decides_each_frame_of_one_batch_on_its_own(guest):
    """The switch keeps the last source it learned and the last destination
    it looked up for the rest of a batch: every frame of one batch (one
    send is one batch) must still go where the table says at that frame.
    A destination first unknown (flooded) that the batch itself then
    learns behind the in-port is filtered from then on, not flooded from
    the remembered lookup; alternating destinations and sources each go
    their own way."""
    engine = Engine(app="switch", poll="busy")
    ports = Ports(engine, guest, 3)
    ports.send(1, [eth(BCAST, mac(2))])             # B behind port 1
    ports.send(2, [eth(BCAST, mac(3))])             # C behind port 2
    ports.received()
    to_x = eth(mac(9), mac(1), fill=1)              # X unknown yet: flooded
    from_x = eth(mac(2), mac(9), fill=2)            # X speaks from port 0: learned there
    to_x_again = eth(mac(9), mac(1), fill=3)        # X is behind the in-port now: filtered
    to_b, to_c = eth(mac(2), mac(1), fill=4), eth(mac(3), mac(1), fill=5)
    from_d = eth(mac(3), mac(4), fill=6)            # another source, same destination
    ports.send(0, [to_x, from_x, to_x_again, to_b, to_c, to_b, from_d, to_c])
    assert ports.received() == [[], [to_x, from_x, to_b, to_b], [to_x, to_c, from_d, to_c]]
    assert ports.stats(0)["drop_filtered"] == 1
    table = engine.mac_table()
    assert {table[int.from_bytes(mac(i), "big")] for i in (1, 4, 9)} == {0}
    # A station that moves between batches is followed at once.
    ports.send(2, [eth(BCAST, mac(9))])
    ports.received()
    ports.send(0, [to_x_again, to_x_again])
    assert ports.received() == [[], [], [to_x_again, to_x_again]]


def test_switch_moved_station_and_ageing(guest):
    engine = Engine(app="switch", poll="busy", mac_ageing=0.2)
    ports = Ports(engine, guest, 3)
    ports.send(0, [eth(BCAST, mac(1))])
    ports.received()
    to_a = eth(mac(1), mac(2))
    ports.send(1, [to_a])
    assert ports.received() == [[to_a], [], []]
    ports.send(2, [eth(BCAST, mac(1))])             # A moved behind port 2
    ports.received()
    ports.send(1, [to_a])
    assert ports.received() == [[], [], [to_a]]
    time.sleep(0.3)                                 # aged out: unknown again, flooded
    ports.send(1, [to_a])
    assert ports.received() == [[to_a], [], [to_a]]


def test_switch_queue_full_counts_no_room(guest):
    engine = Engine(app="switch", poll="busy")
    ports = Ports(engine, guest, 2)
    frames = [eth(BCAST, mac(1), fill=i) for i in range(200)]
    for i in range(0, 200, 50):
        ports.send(0, frames[i:i + 50])
    got = ports.received()
    assert got[1] == frames[:128]                   # port 1 posted 128 receive buffers
    assert ports.stats(1, "rx")["rx_no_room"] == 72


def open_capture(engine, path, snaplen=65535):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, PCAP_HEADER.pack(0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
    return fd, engine.add_capture(fd, snaplen)


def read_pcap(path):
    with open(path, "rb") as f:
        r = dpkt.pcap.Reader(f)
        assert r.datalink() == dpkt.pcap.DLT_EN10MB
        return [(ts, bytes(buf)) for ts, buf in r]


@pytest.mark.parametrize("snaplen", [65535, 100])
def test_capture_both_directions_beside_patch(guest, tmp_path, snaplen):
    engine = Engine(app="patch", poll="busy")
    fds, caps = [], []
    for p in range(2):
        slots = []
        for d in ("rx", "tx"):
            fd, slot = open_capture(engine, tmp_path / f"{p}-{d}.pcap", snaplen)
            fds.append(fd)
            slots.append(slot)
        caps.append(slots)
    ports = Ports(engine, guest, 2, captures=caps)
    ports.pairs[0]["peer"], ports.pairs[1]["peer"] = 1, 0
    engine.set_bindings(ports.pairs)
    sent = [eth(mac(2), mac(1), size=60 + 6 * i, fill=i) for i in range(300)]
    t0 = time.time()
    for i in range(0, 300, 30):     # port 1 has 128 buffers: the rest are dropped
        ports.send(0, sent[i:i + 30])
    engine.flush()
    t1 = time.time()
    got = ports.received()[1]
    assert got == sent[:128]
    rx0 = read_pcap(tmp_path / "0-rx.pcap")
    tx1 = read_pcap(tmp_path / "1-tx.pcap")
    assert [f for _, f in rx0] == [f[:snaplen] for f in sent]       # all the guest sent
    assert [f for _, f in tx1] == [f[:snaplen] for f in got]        # what port 1 received
    assert read_pcap(tmp_path / "0-tx.pcap") == read_pcap(tmp_path / "1-rx.pcap") == []
    assert all(t0 - 1 <= ts <= t1 + 1 for ts, _ in rx0 + tx1)
    if snaplen < 65535:             # orig_len keeps the real length
        with open(tmp_path / "0-rx.pcap", "rb") as f:
            lens = [len(buf) for _, buf in dpkt.pcap.Reader(f)]
        assert max(lens) == snaplen
    assert engine.capture_stats()[0] == dict(records=300, write_errors=0)
    for fd in fds:
        os.close(fd)


# -- Python stages ------------------------------------------------------------

def frames_of(meta, bufs):
    return [bytes(bufs[m["buf"]][m["offset"]:m["offset"] + m["length"]]) for m in meta]


def test_stage_sees_frames_and_routes_by_verdict(guest):
    calls = []

    def stage(meta, bufs):
        calls.append((frames_of(meta, bufs), meta["port"].tolist()))
        ethertype = np.array([int.from_bytes(bufs[m["buf"]][m["offset"] + 12:m["offset"] + 14],
                                             "big") for m in meta])
        # the engine's own header fields agree with the bytes
        assert meta["ethertype"].tolist() == ethertype.tolist()
        assert set(meta["src_mac"].tolist()) == {0x525400000001}
        assert set(meta["dst_mac"].tolist()) == {0xFFFFFFFFFFFF}
        # IPv6 dropped, ARP to port 2, the rest to the app (patch: port 1)
        return np.where(ethertype == 0x86DD, -1, np.where(ethertype == 0x0806, 2, -2))

    engine = Engine(app="patch", poll="busy", stage=stage)
    ports = Ports(engine, guest, 3)
    ports.pairs[0]["peer"] = 1
    engine.set_bindings(ports.pairs)
    ip4, ip6, arp = (eth(BCAST, mac(1), t) for t in (0x0800, 0x86DD, 0x0806))
    ports.send(0, [ip4, ip6, arp, ip4])
    assert len(calls) == 1, "one call per batch"
    assert calls[0] == ([ip4, ip6, arp, ip4], [0, 0, 0, 0])
    assert ports.received() == [[], [ip4, ip4], [arp]]
    assert ports.stats(0)["drop_stage"] == 1


def test_stage_rewrites_in_place_including_split_frames(guest):
    def stage(meta, bufs):
        for m in meta:
            bufs[m["buf"]][m["offset"]:m["offset"] + 6] = np.frombuffer(mac(0xAA), np.uint8)
        return None                                 # everything to the app (echo)

    engine = Engine(app="echo", poll="busy", stage=stage)
    ports = Ports(engine, guest, 1)
    ports.pairs[0]["peer"] = 0
    engine.set_bindings(ports.pairs)
    f = eth(mac(5), mac(1), size=200)
    ports.send(0, [f])
    # A frame split over two descriptors (header + part, rest) is gathered.
    tx = ports.drivers[0][1]
    g2 = eth(mac(6), mac(1), size=300, fill=9)
    whole = bytes(12) + g2
    guest.mem.write(0x900000, whole[:100])
    guest.mem.write(0x910000, whole[100:])
    tx.add([(0x900000, 100), (0x910000, len(whole) - 100)])
    tx.publish()
    engine.run(0.02)
    assert ports.received() == [[mac(0xAA) + f[6:], mac(0xAA) + g2[6:]]]


def test_raising_stage_drops_its_batch_and_keeps_running(guest, caplog):
    state = {"n": 0}

    def stage(meta, bufs):
        state["n"] += 1
        if state["n"] == 1:
            raise RuntimeError("boom in stage")
        if state["n"] == 2:
            return [0]                              # wrong length: an error too
        return None

    engine = Engine(app="echo", poll="busy", stage=stage)
    ports = Ports(engine, guest, 1)
    ports.pairs[0]["peer"] = 0
    engine.set_bindings(ports.pairs)
    with caplog.at_level("ERROR", logger="vhu.workers.engine"):
        ports.send(0, [eth(BCAST, mac(1))] * 3)
    assert "boom in stage" in caplog.text and "Traceback" in caplog.text
    ports.send(0, [eth(BCAST, mac(1))] * 2)
    ok = eth(BCAST, mac(1), fill=7)
    ports.send(0, [ok])
    assert ports.received() == [[ok]]
    assert ports.stats(0)["drop_stage_error"] == 5
    assert engine.stage_errors == 2


# -- TAP bindings ---------------------------------------------------------------

def _tap_usable():
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun")


@pytest.mark.skipif(not _tap_usable(), reason="needs root and /dev/net/tun")
def test_tap_binding_both_directions(guest):
    """A TAP patched to a guest port: what the guest sends comes out of the
    interface (seen by an AF_PACKET socket on it), what the kernel sends out
    of the interface arrives in the guest's RX ring. Counters as a ring pair."""
    import socket
    import subprocess
    from vhu._ring import COUNTER_NAMES
    from vhu.tap import open_tap
    name = f"vhue{os.getpid() % 100000}"
    fd = open_tap(name)
    pkt = None
    try:
        subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        pkt = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        pkt.bind((name, 0))
        pkt.settimeout(2)
        engine = Engine(app="patch", poll="busy")
        ports = Ports(engine, guest, 1)
        counters = np.zeros(2 * len(COUNTER_NAMES), np.uint64)
        ports.pairs[0]["peer"] = 1
        pairs = ports.pairs + [dict(tap_fd=fd, tap_counters=counters, port=1, queue=0, peer=0)]
        engine.set_bindings(pairs)
        out = [eth(mac(9), mac(1), 0x88B5, size=100, fill=i) for i in range(20)]
        ports.send(0, out)
        got = [pkt.recv(2048) for _ in range(20)]
        assert got == out
        n = len(COUNTER_NAMES)
        rx = dict(zip(COUNTER_NAMES, counters[:n].tolist()))
        assert (rx["rx_frames"], rx["rx_bytes"]) == (20, 2000)
        into = [eth(mac(1), mac(9), 0x88B5, size=80, fill=100 + i) for i in range(10)]
        for f in into:
            pkt.send(f)
        engine.run(0.05)
        assert ports.received()[0] == into
        tx = dict(zip(COUNTER_NAMES, counters[n:].tolist()))
        assert (tx["tx_frames"], tx["tx_bytes"]) == (10, 800)
        engine.set_bindings([])
    finally:
        if pkt is not None:
            pkt.close()
        os.close(fd)


class CountingStage:
    """A stage class: instantiated once per worker, state kept across batches."""
    instances = 0

    def __init__(self):
        CountingStage.instances += 1
        self.seen = 0

    def __call__(self, batch):
        self.seen += len(batch)
        return np.full(len(batch), 0 if self.seen <= 4 else -1)    # then drop


def test_stage_runner_instantiates_classes_once_and_chains_stages(guest):
    import pickle
    from vhu.workers.forwarder import APP, DROP, StageRunner

    def drop_arp(batch):
        return np.where(batch.ethertype == 0x0806, DROP, APP)

    runner = pickle.loads(pickle.dumps(StageRunner([CountingStage])))
    runner.stages.append(lambda batch: np.where(batch.verdicts == APP, 0, batch.verdicts))
    runner.stages.insert(0, drop_arp)
    engine = Engine(app="sink", poll="busy", stage=runner)
    ports = Ports(engine, guest, 1)
    f = eth(BCAST, mac(1))
    ports.send(0, [f] * 3)
    ports.send(0, [f] * 3)
    # CountingStage sees 3 then 6 frames: to port 0, then dropped; drop_arp's
    # verdicts were replaced by later stages (each stage's verdicts win).
    assert ports.received() == [[f] * 3]
    assert CountingStage.instances == 1
    assert ports.stats(0)["drop_stage"] == 3


def test_switch_mac_flood_stays_bounded_and_keeps_switching(guest):
    """A guest sending from thousands of made-up source MACs fills the
    table, never more; stations keep reaching each other (re-learned, or
    flooded while unknown)."""
    engine = Engine(app="switch", poll="busy")
    ports = Ports(engine, guest, 3)
    rng = np.random.default_rng(1)
    for _ in range(60):
        srcs = rng.integers(1, 1 << 48, 100) & ~(1 << 40)  # unicast: group bit clear
        ports.send(0, [eth(BCAST, int(s).to_bytes(6, "big")) for s in srcs])
        ports.received()
        ports.g.post_rx(ports.drivers[1][0], 1, 100)
        ports.g.post_rx(ports.drivers[2][0], 2, 100)
    assert 3500 <= len(engine.mac_table()) <= 4096
    ports.send(1, [eth(BCAST, mac(2))])
    ports.received()
    f = eth(mac(2), mac(3))
    ports.send(2, [f])
    assert ports.received() == [[], [f], []]


def test_bad_binding_sets_are_refused_before_anything_changes(guest):
    engine = Engine(app="patch", poll="busy")
    ports = Ports(engine, guest, 2)
    ports.pairs[0]["peer"], ports.pairs[1]["peer"] = 1, 0
    engine.set_bindings(ports.pairs)
    for bad in ([dict(port=0), dict(port=0)], [dict(port=64)], [dict(queue=64)],
                [dict(peer=3)], [dict(cap_rx=0)], [dict(tap_fd=0)]):
        with pytest.raises(ValueError):
            engine.set_bindings(bad)
    f = eth(mac(2), mac(1))
    ports.send(0, [f])                      # the old set still runs
    assert ports.received() == [[], [f]]
