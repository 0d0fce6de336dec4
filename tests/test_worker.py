"""The worker data path: compiled engine apps and poll modes, worker processes."""
import os
import struct
import time

import numpy as np
import pytest

from vhu._mem import GuestMemory
from vhu._ring import COUNTER_NAMES, DeviceRing, DriverRing
from vhu.workers._engine import Engine
from vhu.workers.process import RingSetup
from vhu.workers.supervisor import WorkerError

from tests.workerpool import PoolThread

VERSION_1, MRG_RXBUF, EVENT_IDX = 1 << 32, 1 << 15, 1 << 29
FEATURES = VERSION_1 | MRG_RXBUF | EVENT_IDX
UVA = 0x7F0000000000
GUEST = 32 << 20
HDR = 12


class Guest:
    """A front-end's view: its memory and the driver side of its queue pairs."""

    def __init__(self, size=GUEST):
        self.fd = os.memfd_create("guest")
        os.ftruncate(self.fd, size)
        self.mem = GuestMemory()
        self.mem.set_table([(self.fd, 0, size, UVA, 0)])
        self.next_ring = 0
        self.rx_slots = {}

    def ring_addrs(self, base):
        return base, base + 0x2000, base + 0x4000

    def rings(self, qp, size=256, event_idx=True):
        """Driver rings (rx, tx) of queue pair qp, and the device-side setups."""
        out = []
        for kind in (0, 1):
            base = 0x10000 * (2 * qp + kind)
            d, a, u = self.ring_addrs(base)
            drv = DriverRing(self.mem, size, d, a, u, event_idx=event_idx)
            setup = RingSetup(size, UVA + d, UVA + a, UVA + u, 0, FEATURES, event_idx, True, True)
            out.append((drv, setup))
        return out

    def device_ring(self, mem, setup):
        ring = DeviceRing(mem, setup.size, setup.desc, setup.avail, setup.used,
                          event_idx=setup.event_idx, features=setup.features)
        return ring

    def post_rx(self, rx, qp, n, slot=2048):
        base = 0x1000000 + qp * 0x200000
        for i in range(n):
            gpa = base + (i % 512) * slot
            self.rx_slots[(qp, rx.add([], [(gpa, slot)]))] = gpa
        return rx.publish()

    def send(self, tx, qp, frames):
        base = 0x800000 + qp * 0x80000
        for i, f in enumerate(frames):
            gpa = base + i * 2048
            self.mem.write(gpa, bytes(HDR) + f)
            tx.add([(gpa, HDR + len(f))])
        return tx.publish()

    def received(self, rx, qp):
        """Frames in used RX buffers (one buffer each here), header stripped."""
        out = []
        for head, length in rx.get_used():
            data = self.mem.read(self.rx_slots.pop((qp, head)), length)
            assert struct.unpack_from("<H", data, 10)[0] == 1     # num_buffers
            out.append(data[HDR:])
        return out

    def close(self):
        os.close(self.fd)


def frames(n, size=64, seed=0):
    return [bytes([(seed + i + j) & 0xFF for j in range(size)]) for i in range(n)]


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.close()


def bind(engine, g, qps, peers):
    """Device rings for each (rx, tx) driver pair; returns the driver rings."""
    pairs, drivers = [], []
    mem = GuestMemory()
    mem.set_table([(g.fd, 0, GUEST, UVA, 0)])
    for qp in range(qps):
        (rx, rxs), (tx, txs) = g.rings(qp)
        pairs.append(dict(rx=g.device_ring(mem, rxs), tx=g.device_ring(mem, txs),
                          peer=peers[qp]))
        drivers.append((rx, tx))
    engine.set_bindings(pairs)
    return drivers, pairs


def test_engine_echo_returns_every_frame_unchanged(guest):
    engine = Engine(app="echo", poll="busy")
    drivers, _ = bind(engine, guest, 2, [0, 1])
    sent = {}
    for qp, (rx, tx) in enumerate(drivers):
        guest.post_rx(rx, qp, 200)
        sent[qp] = frames(100, 60 + 37 * qp, seed=qp)
        guest.send(tx, qp, sent[qp])
    assert engine.run(0.05) == 200
    for qp, (rx, tx) in enumerate(drivers):
        assert guest.received(rx, qp) == sent[qp]
        assert len(tx.get_used()) == 100


def test_engine_counts_busy_ticks_only_in_rounds_that_move_frames(guest):
    """The load a worker reports (vhu.stats.WorkerSlot.LOAD, the stats'
    "busy"): polling ticks grow with the loop's time, busy ticks only in the
    rounds that moved frames, here the four batches a stage holds for 30 ms
    each, out of a 0.4 s run."""
    def slow(meta, bufs):
        time.sleep(0.03)
        return np.full(len(meta), -2)             # each frame to the app (echo)

    engine = Engine(app="echo", poll="busy", stage=slow)
    drivers, _ = bind(engine, guest, 1, [0])
    rx, tx = drivers[0]
    guest.post_rx(rx, 0, 200)
    t0 = time.monotonic()
    engine.run(0.2)
    idle_seconds = time.monotonic() - t0
    poll, busy = engine.load_ticks()
    assert poll > 0 and busy == 0, "no frames: nothing busy"
    ticks_per_second = poll / idle_seconds
    guest.send(tx, 0, frames(4 * 32))
    t0 = time.monotonic()
    engine.run(0.4)
    seconds = time.monotonic() - t0
    poll2, busy2 = engine.load_ticks()
    assert len(guest.received(rx, 0)) == 4 * 32
    busy_seconds = busy2 / ticks_per_second
    print(f"{ticks_per_second / 1e9:.2f} G ticks/s; busy {busy_seconds * 1e3:.0f} ms "
          f"of a {seconds * 1e3:.0f} ms run")
    # At least the four stage calls (a loaded machine only adds to both).
    assert 0.9 * 4 * 0.03 <= busy_seconds < (poll2 - poll) / ticks_per_second, (poll2 - poll, busy2)


def test_engine_patch_crosses_queue_pairs_and_sink_counts(guest):
    engine = Engine(app="patch", poll="busy")
    drivers, pairs = bind(engine, guest, 2, [1, 0])     # two "ports" on one memory
    (rx0, tx0), (rx1, tx1) = drivers
    guest.post_rx(rx1, 1, 64)
    guest.send(tx0, 0, frames(50, 1500))
    engine.run(0.05)
    assert guest.received(rx1, 1) == frames(50, 1500)
    assert guest.received(rx0, 0) == []
    tx_stats = pairs[0]["tx"].stats
    assert (tx_stats["tx_frames"], tx_stats["tx_bytes"]) == (50, 50 * 1500)


def test_engine_drops_when_receiver_has_no_room(guest):
    engine = Engine(app="echo", poll="busy")
    drivers, pairs = bind(engine, guest, 1, [0])
    rx, tx = drivers[0]
    guest.post_rx(rx, 0, 10)
    guest.send(tx, 0, frames(30))
    engine.run(0.05)
    assert len(guest.received(rx, 0)) == 10
    assert len(tx.get_used()) == 30                     # the guest gets all its TX buffers back
    assert pairs[0]["rx"].stats["rx_no_room"] == 20


def test_engine_source_fills_rx(guest):
    frame = frames(1, 64)[0]
    engine = Engine(app="source", poll="busy", frame=frame)
    drivers, _ = bind(engine, guest, 1, [-1])
    rx, _ = drivers[0]
    guest.post_rx(rx, 0, 128)
    engine.run(0.02)
    assert guest.received(rx, 0) == [frame] * 128


@pytest.mark.parametrize("mode", ["epoll", "adaptive"])
def test_sleeping_engine_wakes_on_kick_and_costs_no_cpu_idle(guest, mode):
    engine = Engine(app="sink", poll=mode, idle_spins=1000)
    mem = GuestMemory()
    mem.set_table([(guest.fd, 0, GUEST, UVA, 0)])
    (rx, rxs), (tx, txs) = guest.rings(0)
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        ring = guest.device_ring(mem, txs)
        engine.set_bindings([dict(rx=None, tx=ring, tx_kick=kick)])
        c0 = time.process_time()
        assert engine.run(0.3) == 0
        assert time.process_time() - c0 < 0.03, "an idle worker must sleep"
        assert engine.sleeps >= 1
        # The engine enabled notifications before sleeping: the driver must kick.
        assert guest.send(tx, 0, frames(5)) is True
        os.eventfd_write(kick, 1)
        assert engine.run(0.1) == 5
        assert ring.stats["tx_frames"] == 5
    finally:
        os.close(kick)


def test_racing_buffers_are_seen_before_sleeping(guest):
    """Buffers made available while notifications were off (no kick will
    come) are found by the re-check after enabling them."""
    engine = Engine(app="sink", poll="epoll")
    mem = GuestMemory()
    mem.set_table([(guest.fd, 0, GUEST, UVA, 0)])
    (_, _), (tx, txs) = guest.rings(0, event_idx=False)
    ring = guest.device_ring(mem, txs)
    ring.disable_notifications()
    assert guest.send(tx, 0, frames(3)) is False        # suppressed: no kick
    engine.set_bindings([dict(rx=None, tx=ring, tx_kick=-1)])
    assert engine.run(0.05) == 3


# -- worker processes -------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def warm_multiprocessing():
    """multiprocessing keeps a helper fd or two for the life of the process
    after the first spawn; start one pool first so fd counts compare like
    with like."""
    PoolThread(1).close()


def ring_counters(stats, port, ring):
    return dict(zip(COUNTER_NAMES, (int(x) for x in stats.ring(port, ring))))


def wait_for(cond, timeout=10.0):
    t = time.monotonic() + timeout
    while time.monotonic() < t:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_worker_process_echo_survives_memory_table_change(guest):
    """DPDK virtio-user sends SET_MEM_TABLE again while rings run: the worker
    remaps between batches and no frame is lost or duplicated."""
    fds_before = len(os.listdir("/proc/self/fd"))
    w = PoolThread(1, app="echo", poll="adaptive")
    try:
        w.call("mem", 0, [(0, GUEST * 3 // 4, UVA, 0)], fds=[os.dup(guest.fd)])
        (rx, rxs), (tx, txs) = guest.rings(0)
        kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        for idx, setup in ((0, rxs), (1, txs)):
            w.call("ring_start", 0, idx, setup, fds=[os.dup(kicks[idx]), os.eventfd(0)])
        got, sent = [], []
        for rnd in range(20):
            batch = frames(16, 64 + rnd, seed=rnd)
            sent += batch
            guest.post_rx(rx, 0, 16)
            os.eventfd_write(kicks[0], 1)
            guest.send(tx, 0, batch)
            os.eventfd_write(kicks[1], 1)
            if rnd % 4 == 1:
                # grow the table (new mapping, same memory), as DPDK does
                w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])
            tx_done = []
            assert wait_for(lambda: tx_done.extend(tx.get_used()) or len(tx_done) == 16)
            assert wait_for(lambda: got.extend(guest.received(rx, 0)) or len(got) == len(sent))
        assert got == sent
        assert w.call("ring_stop", 0, 1) == 320
        assert ring_counters(w.stats, 0, 1)["tx_frames"] == 320
        assert ring_counters(w.stats, 0, 0)["rx_frames"] == 320
        assert w.call("port_reset", 0) is True
        for k in kicks:
            os.close(k)
    finally:
        w.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_worker_reports_bad_ring_setup_and_keeps_serving(guest):
    w = PoolThread(1)
    try:
        w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])
        bad = RingSetup(256, UVA + GUEST, UVA, UVA, 0, FEATURES, True, True, True)
        with pytest.raises(WorkerError, match="not inside guest memory"):
            w.call("ring_start", 0, 1, bad, fds=[os.eventfd(0), os.eventfd(0)])
        (_, _), (tx, txs) = guest.rings(0)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        w.call("ring_start", 0, 1, txs, fds=[os.dup(kick), os.eventfd(0)])
        guest.send(tx, 0, frames(7))
        os.eventfd_write(kick, 1)
        assert wait_for(lambda: ring_counters(w.stats, 0, 1)["tx_frames"] == 7)
        os.close(kick)
    finally:
        w.close()


def test_ring_restarts_where_the_used_ring_is_not_at_a_stale_base(guest):
    """A front-end that lost its back-end may send a SET_VRING_BASE ahead of
    the used ring (QEMU sends used->idx; others keep their own count). The
    worker resumes at used->idx: the driver gets exactly its chains back, in
    order, and nothing past what was written."""
    w = PoolThread(1)
    try:
        w.call("mem", 0, [(0, GUEST, UVA, 0)], fds=[os.dup(guest.fd)])
        (_, _), (tx, txs) = guest.rings(0)
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        w.call("ring_start", 0, 1, txs, fds=[os.dup(kick), os.eventfd(0)])
        guest.send(tx, 0, frames(5))
        os.eventfd_write(kick, 1)
        done = []
        assert wait_for(lambda: done.extend(tx.get_used()) or len(done) == 5)
        assert w.call("ring_stop", 0, 1) == 5
        stale = RingSetup(**{**txs.__dict__, "base": 9})
        w.call("ring_start", 0, 1, stale, fds=[os.dup(kick), os.eventfd(0)])
        guest.send(tx, 0, frames(3, seed=7))
        os.eventfd_write(kick, 1)
        done = []
        assert wait_for(lambda: done.extend(tx.get_used()) or len(done) == 3)
        time.sleep(0.1)
        assert tx.get_used() == [] and len(done) == 3
        assert w.call("ring_stop", 0, 1) == 8
        assert ring_counters(w.stats, 0, 1)["tx_frames"] == 8
        os.close(kick)
    finally:
        w.close()


# -- hostile input the engine itself must survive ---------------------------------


def test_engine_kick_fd_that_hangs_up_breaks_its_ring_without_spinning(guest):
    """A kick fd whose other end hung up is readable (EPOLLHUP) for ever: an
    epoll worker would wake at once, every time. The engine breaks that ring
    (kick_fd_error), stops watching the fd and sleeps."""
    engine = Engine(app="sink", poll="epoll")
    mem = GuestMemory()
    mem.set_table([(guest.fd, 0, GUEST, UVA, 0)])
    (_, _), (tx, txs) = guest.rings(0)
    ring = guest.device_ring(mem, txs)
    r, w = os.pipe()
    os.close(w)
    engine.set_bindings([dict(rx=None, tx=ring, tx_kick=r)])
    cpu0 = time.process_time()
    engine.run(0.5)
    used = time.process_time() - cpu0
    assert ring.broken_reason == "the kick fd reported an error or hang-up"
    assert ring.stats["broken_kick_fd_error"] == 1
    # Once the fd is gone, the engine sleeps its whole timeout each time (5
    # wake-ups in 0.5 s); a spinning one would count thousands.
    assert engine.wakeups <= 8, engine.wakeups
    assert used < 0.2, f"{used:.2f} s of CPU in 0.5 s: the engine spun"
    os.close(r)


def test_engine_drops_an_oversized_chain_and_delivers_nothing(guest):
    """200 descriptors on one 4 KiB page claim an 819 200-byte frame: the
    chain is returned, counted tx_too_big, and no byte of it reaches the RX
    ring (echo would have sent it back)."""
    engine = Engine(app="echo", poll="busy")
    drivers, pairs = bind(engine, guest, 1, [0])
    rx, tx = drivers[0]
    guest.post_rx(rx, 0, 64)
    page = 0x900000
    guest.mem.write(page, bytes(4096))
    tx.add([(page, 4096)] * 200)
    tx.publish()
    guest.send(tx, 0, frames(3))
    engine.run(0.05)
    assert len(tx.get_used()) == 4
    got = guest.received(rx, 0)
    assert got == frames(3), "only the three real frames come back"
    st = pairs[0]["tx"].stats
    assert st["tx_too_big"] == 1 and st["tx_frames"] == 3


def test_no_two_queue_pairs_share_a_cache_line_of_counters():
    """Each queue pair's counters (written by the worker that owns the pair)
    sit on cache lines of their own, and counter_offset, the view and the
    snapshot agree on where each ring's counters are."""
    from vhu.stats import COUNTERS_PER_RING, StatsMemory, counter_offset
    rings = 8
    lines = {}
    for port in range(3):
        for ring in range(rings):
            off = counter_offset(port, ring, rings)
            for line in range(off // 64, (off + COUNTERS_PER_RING * 8 - 1) // 64 + 1):
                owner = lines.setdefault(line, (port, ring // 2))
                assert owner == (port, ring // 2), f"line {line}: {owner} and {(port, ring // 2)}"
    mem = StatsMemory(3, rings, 2)
    try:
        words = np.frombuffer(mem._map, dtype=np.uint64)
        for port in range(3):
            for ring in range(rings):
                mem.count(port, ring, COUNTER_NAMES[ring % len(COUNTER_NAMES)], port * 100 + ring + 1)
        snap = mem.snapshot()
        for port in range(3):
            for ring in range(rings):
                i = ring % len(COUNTER_NAMES)
                assert words[counter_offset(port, ring, rings) // 8 + i] == port * 100 + ring + 1
                assert snap[port, ring, i] == port * 100 + ring + 1
        assert snap.sum() == sum(p * 100 + r + 1 for p in range(3) for r in range(rings))
        mem.ring(0, 0)[0] += 1
        assert snap[0, 0, 0] == 1, "a snapshot is a copy"
    finally:
        del words
        mem.close()
